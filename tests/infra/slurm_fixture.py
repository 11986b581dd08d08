"""pytest plugin: a real single-node SLURM for tests (``tests/infra/slurm/start-slurm.sh``).

Register it in the root ``tests/conftest.py`` with ``pytest_plugins = ["tests.infra.slurm_fixture"]``
(or import ``slurm_cluster`` into a test module), then request the session fixture ``slurm_cluster``.

- A cluster that is already up (``sinfo`` answers and shows partitions ``cpu`` and ``gpu``) is
  reused as it is, whoever started it.
- Otherwise the fixture starts one (root; installs the Debian packages when missing, waiting for
  a busy apt) and stops it at the end of the session, unless another pytest session is still
  using it; then the last session using it stops it. Under pytest-xdist the workers share one
  cluster: the first worker that needs it starts it, the controller stops it after the run.
- Where no cluster can be started (not root, no apt-get, the start fails) the tests FAIL with the
  reason: a SLURM test that silently skips proves nothing. ``MQI_SKIP_SLURM=1`` skips them instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

import pytest

SLURM_DIR = Path(__file__).resolve().parent / "slurm"
START = SLURM_DIR / "start-slurm.sh"
STOP = SLURM_DIR / "stop-slurm.sh"
PARTITIONS = ("cpu", "gpu")
# Written by this fixture when it starts the cluster: the last session using it stops it.
STARTED_MARKER = ".started-by-pytest"


def slurm_root() -> Path:
    return Path(os.environ.get("SLURM_CI_ROOT", "/tmp/mqi-slurm"))


@dataclass(frozen=True)
class SlurmCluster:
    root: Path  # state, logs and pid files of start-slurm.sh (meaningful if this project started it)
    partitions: tuple[str, ...]  # as sinfo lists them
    started_here: bool  # this session started it (and will stop it)
    start_seconds: float | None  # wall time of start-slurm.sh, None when reused


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def running_partitions() -> tuple[str, ...] | None:
    """Partitions of the cluster answering ``sinfo`` with a usable node, or None when none is up."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return None
    try:
        # `scontrol ping` answers at once; sinfo retries for ~10 s when no controller is up.
        ping = _run(["scontrol", "ping"], timeout=15)
        if " is UP" not in ping.stdout:
            return None
        out = _run(["sinfo", "-h", "-o", "%P %T"], timeout=15)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(state in ("idle", "mixed", "allocated", "completing") for _, state in rows):
        return None
    return tuple(dict.fromkeys(name.rstrip("*") for name, _ in rows))


def why_cluster_cannot_start() -> str | None:
    if os.geteuid() != 0:
        return "starting SLURM needs root (slurmctld/slurmd run as root, the config goes to /etc/slurm)"
    if not START.is_file():
        return f"{START} is missing"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install munge, slurmctld, slurmd, slurm-client"
    return None


def _open_users_lock(root: Path) -> IO[str] | None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return open(root / ".users.lock", "a+")
    except OSError:
        return None


def _start_failure(root: Path, out: subprocess.CompletedProcess[str]) -> str:
    """The reason in a few lines (the script's ERROR lines); everything it printed goes to a file.
    Every SLURM test of the session reports this same message: short, so it is read once."""
    full = root / "start-slurm.out"
    where = f"full output: {full}" if full.is_file() else out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line] or out.stderr.splitlines()[-3:]
    return f"SLURM test cluster could not start ({START.name}, exit {out.returncode}):\n" + "\n".join([*errors, where])


def _fail(message: str) -> NoReturn:
    pytest.fail(f"{message}\n(set MQI_SKIP_SLURM=1 to skip the SLURM tests instead)", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.environ.get("MQI_SKIP_SLURM") == "1":
        pytest.skip("MQI_SKIP_SLURM=1: SLURM tests skipped on request")
    root = slurm_root()
    # Every session using the cluster holds a shared lock; the one that finds no other user at the
    # end stops a cluster a pytest session started.
    users = _open_users_lock(root)
    if users is not None:
        fcntl.flock(users, fcntl.LOCK_SH)
    try:
        started_here = False
        start_seconds = None
        partitions = running_partitions()
        if partitions is None:
            reason = why_cluster_cannot_start()
            if reason:
                _fail(f"no SLURM cluster is up and none can be started here: {reason}")
            t0 = time.monotonic()
            try:
                out = _run(["bash", str(START)], timeout=900)
            except subprocess.TimeoutExpired:
                _fail(f"{START} did not finish within 900 s")
            start_seconds = time.monotonic() - t0
            with contextlib.suppress(OSError):  # what the start said (apt waits included), kept
                (root / "start-slurm.out").write_text(out.stdout + out.stderr)
            if out.returncode != 0:
                _fail(_start_failure(root, out))
            (root / STARTED_MARKER).touch()
            started_here = True
            partitions = running_partitions()
            if partitions is None:
                _fail(f"{START} succeeded but sinfo shows no usable node:\n{out.stdout}")
        assert partitions is not None
        missing = [p for p in PARTITIONS if p not in partitions]
        if missing:
            _fail(
                f"the SLURM cluster that is up lacks partition(s) {missing} (it has {list(partitions)}): "
                f"it is not the test cluster; stop it, then the fixture starts {START}"
            )
        yield SlurmCluster(root, partitions, started_here, start_seconds)
    finally:
        if users is not None:
            fcntl.flock(users, fcntl.LOCK_UN)
            if not os.environ.get("PYTEST_XDIST_WORKER"):  # an xdist worker leaves it to the controller
                _stop_if_last_user(root, users)
            users.close()


def _stop_if_last_user(root: Path, users: IO[str]) -> None:
    """Stop the cluster if a pytest session started it and no other session still uses it."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another session still uses the cluster; the last one stops it
    try:
        if (root / STARTED_MARKER).exists():
            _run(["bash", str(STOP)], timeout=120)
            (root / STARTED_MARKER).unlink(missing_ok=True)
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist, the workers share one cluster (the first that needs it starts it) and
    the controller stops it once every worker has finished: one cluster per test run."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not session.config.pluginmanager.hasplugin("dsession"):
        return
    users = _open_users_lock(slurm_root())
    if users is not None:
        with users:
            _stop_if_last_user(slurm_root(), users)


def active_jobs(name_prefix: str) -> list[str]:
    """``jobid state name`` of the queued or running jobs whose name starts with name_prefix."""
    out = _run(["squeue", "-h", "-t", "PD,R,CG,CF,S,RQ,RS", "-o", "%i %T %j"], timeout=15)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr}")
    return [line for line in out.stdout.splitlines() if line.split()[-1].startswith(name_prefix)]

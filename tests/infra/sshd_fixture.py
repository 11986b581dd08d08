"""pytest plugin: a throwaway OpenSSH server on 127.0.0.1 for the whole test session.

Register it in tests/conftest.py with ``pytest_plugins = ["tests.infra.sshd_fixture"]`` (or run
``pytest -p tests.infra.sshd_fixture``). The ``sshd_server`` fixture starts
tests/infra/ssh/start-sshd.sh once per session (installing openssh-server when missing, as
root) and stops what it started at the end. It fails with the reason when the server cannot
start; it skips only when ``MQI_SKIP_SSHD=1``.

Tests may stop, kill, SIGSTOP or restart it (same port, same keys) through the `SshServer`
methods; a later test gets it running again via `SshServer.ensure_running`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent / "ssh"
START_TIMEOUT_S = 900  # the first start may wait for apt (up to 600 s) and install openssh-server


class SshdError(RuntimeError):
    pass


def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses
        rest = text[text.rfind(")") + 2 :].split()
        if rest[0] not in ("Z", "X"):
            parents[int(entry)] = int(rest[1])
    return parents


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return pid in _ppid_map()


@dataclass
class SshServer:
    """The running test server and what a client needs to reach it."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    user: str = ""
    key: Path = field(default_factory=Path)
    known_hosts: Path = field(default_factory=Path)
    ssh_config: Path = field(default_factory=Path)
    log: Path = field(default_factory=Path)
    remote_dir: Path = field(default_factory=Path)
    pid: int = 0
    startup_s: float = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart after a stop/kill: same port and keys, so known_hosts stays valid)."""
        env = dict(os.environ)
        if self.port:
            env["SSHD_PORT"] = str(self.port)
        try:
            proc = subprocess.run(
                [str(SCRIPTS / "start-sshd.sh"), str(self.state_dir)],
                env=env,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            raise SshdError(f"start-sshd.sh did not finish in {START_TIMEOUT_S} s:\n{stderr[-3000:]}") from exc
        if proc.returncode != 0:
            raise SshdError(f"start-sshd.sh failed (rc={proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        try:
            self.port = int(values["SSHD_PORT"])
            self.host = values["SSHD_HOST"]
            self.user = values["SSHD_USER"]
            self.key = Path(values["SSHD_KEY"])
            self.known_hosts = Path(values["SSHD_KNOWN_HOSTS"])
            self.ssh_config = Path(values["SSHD_SSH_CONFIG"])
            self.log = Path(values["SSHD_LOG"])
            self.remote_dir = Path(values["SSHD_REMOTE_DIR"])
            self.pid = int(values["SSHD_PID"])
            self.startup_s = float(values["SSHD_STARTUP_S"])
        except (KeyError, ValueError) as exc:
            raise SshdError(f"start-sshd.sh printed no usable env lines ({exc}):\n{proc.stdout}") from exc

    def stop(self, *, keep: bool = True) -> None:
        """Stop listener and sessions (stop-sshd.sh); ``keep=False`` also removes the state dir."""
        args = [str(SCRIPTS / "stop-sshd.sh"), str(self.state_dir)] + (["--keep"] if keep else [])
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SshdError(f"stop-sshd.sh failed (rc={proc.returncode}): {proc.stderr.strip()}")

    def is_running(self) -> bool:
        return bool(self.pid) and _alive(self.pid) and str(self.state_dir / "sshd_config") in _cmdline(self.pid)

    def ensure_running(self) -> None:
        for pid in self.session_pids():  # a test may have left some stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                return
        self.stop(keep=True)  # leftovers (orphaned sessions)
        self.start()

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Crash the server: ``sig`` to the listener and every session process; returns the pids."""
        pids = [self.pid, *self.session_pids()] if self.is_running() else self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 5
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.01)
        return pids

    # --- processes -----------------------------------------------------------------------------

    def session_pids(self) -> list[int]:
        """Per-connection processes (sshd sessions, sftp-server, commands) below the listener."""
        parents = _ppid_map()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        found: list[int] = []
        todo = list(children.get(self.pid, [])) if self.pid in parents else []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return sorted(found)

    def command_pids(self, program: str) -> list[int]:
        """Session processes running ``program`` (e.g. "sftp-server", "zstd")."""
        return [p for p in self.session_pids() if os.path.basename(_cmdline(p).split(" ")[0]) == program]

    # --- client side -----------------------------------------------------------------------------

    def connect_args(self) -> dict[str, Any]:
        """Keyword arguments for ``mqi_communicator.remote.connection.connect``."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_path": str(self.key),
            "known_hosts_path": str(self.known_hosts),
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshServer]:
    """The session's throwaway sshd (see the module doc)."""
    if os.environ.get("MQI_SKIP_SSHD") == "1":
        pytest.skip("MQI_SKIP_SSHD=1: tests that need the throwaway sshd are skipped")
    # not pytest's tmp_path: that is mode 0700 and the test user must read authorized_keys
    server = SshServer(Path(tempfile.mkdtemp(prefix="mqi-sshd-", dir="/tmp")))
    try:
        server.start()
    except SshdError as exc:
        with contextlib.suppress(Exception):
            server.stop(keep=False)
        shutil.rmtree(server.state_dir, ignore_errors=True)
        pytest.fail(f"the throwaway sshd for the SSH tests could not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop(keep=False)

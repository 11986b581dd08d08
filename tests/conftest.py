"""Shared fixtures: paths to the repo and the clinic's reference data, case factories; how the
suite is spread over pytest-xdist workers (`./test.sh` runs `pytest -n auto --dist loadgroup`)."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mqi_communicator import settings

# Real servers the tests start (and stop) themselves: a single-node SLURM and an OpenSSH server.
pytest_plugins = ["tests.infra.slurm_fixture", "tests.infra.sshd_fixture", "tests.alert_servers"]

REPO = Path(__file__).resolve().parents[1]
# In the repository (tests/data/reference/README.md), so these tests run on every fresh clone.
REFERENCE_DATA = REPO / "tests" / "data" / "reference"


# What a test needs, as a mark (pyproject.toml registers them), so a contributor runs the fast ones
# alone: `pytest -m unit` (docs/development.md).
WORKFLOW_MODULES = ("tests/test_workflow_", "tests/test_kill_resume.py")
SERVER_FIXTURES = {"sshd_server", "slurm_cluster"}


def _kind(nodeid: str, fixtures: set[str]) -> pytest.MarkDecorator:
    """`servers`: starts the real SLURM or sshd; `workflow`: runs Snakemake on whole cases;
    `unit`: everything else (modules, CLIs, files)."""
    if fixtures & SERVER_FIXTURES:
        return pytest.mark.servers
    if nodeid.startswith(WORKFLOW_MODULES) or "embedded_default_run" in fixtures:
        return pytest.mark.workflow
    return pytest.mark.unit


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into scheduling groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep together, on one xdist worker and in order, the tests that must not run side by side:
    - the tests of the sshd ("sshd"): some stop, kill or freeze the one server they share;
    - the other tests of the SLURM cluster ("slurm"): each fills the node with jobs (the sshd
      tests use the same cluster meanwhile: one cluster per run, tests/infra/slurm_fixture.py);
    - the tests of one module that share a module-scoped fixture (an expensive workflow run),
      which each worker that got one of them would otherwise build again.
    The rest is spread over the workers one test at a time; xdist starts the largest groups first,
    then the rest in collection order, where the longest tests are put first (the kill test, then
    the end-to-end workflow tests) so that no long test starts last."""
    first = ("tests/test_kill_resume.py", "tests/test_workflow_")
    items.sort(key=lambda item: next((k for k, head in enumerate(first) if item.nodeid.startswith(head)), len(first)))
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        item.add_marker(_kind(item.nodeid, names))
        if "sshd_server" in names:
            item.add_marker(pytest.mark.xdist_group("sshd"))
        elif "slurm_cluster" in names:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        else:
            info = getattr(item, "_fixtureinfo", None)
            defs = info.name2fixturedefs if info is not None else {}
            if any(defs.get(name) and defs[name][-1].scope == "module" for name in names):
                item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture
def reference_data() -> Path:
    assert (REFERENCE_DATA / "RP_G2_9spots_phantom.dcm").is_file(), f"{REFERENCE_DATA} is incomplete"
    return REFERENCE_DATA


@pytest.fixture
def config() -> dict:
    """The shipped configuration, validated with defaults, as the CLIs receive it."""
    return settings.load(str(REPO / "config" / "config.yaml"))


@contextmanager
def _run_wide_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def embedded_default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample cases through the embedded default (local profile, built-in engine):
    the reference the other deployments must reproduce. Run once per test run: under xdist the
    first worker that needs it runs it, in the folder all workers of this run share."""
    from tests.workflow import snakemake, write_config

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/ (one per run) above .../pytest-N/popen-gwK/
    root = base / "embedded-default"
    with _run_wide_lock(base / "embedded-default.lock"):
        if (root / "done").is_file():
            return root / "work"
        shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way
        root.mkdir()
        shutil.copytree(REPO / "sample_cases", root / "scan")
        (root / "work").mkdir()
        write_config(root / "work", root / "scan")
        run = snakemake(root / "work", timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        (root / "done").touch()
    return root / "work"

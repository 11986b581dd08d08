"""Shared fixtures: paths to the repo and the clinic's reference data, case factories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mqi_communicator import settings

# Real servers the tests start (and stop) themselves: a single-node SLURM and an OpenSSH server.
pytest_plugins = ["tests.infra.slurm_fixture", "tests.infra.sshd_fixture", "tests.alert_servers"]

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DATA = REPO.parent / "shared" / "reference-data"


@pytest.fixture
def reference_data() -> Path:
    if not (REFERENCE_DATA / "RP_G2_9spots_phantom.dcm").is_file():
        pytest.skip(f"clinic reference data not found at {REFERENCE_DATA}")
    return REFERENCE_DATA


@pytest.fixture
def config() -> dict:
    """The shipped configuration, validated with defaults, as the CLIs receive it."""
    return settings.load(str(REPO / "config" / "config.yaml"))


@pytest.fixture(scope="session")
def embedded_default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample cases through the embedded default (local profile, built-in engine):
    the reference the other deployments must reproduce."""
    from tests.workflow import snakemake, write_config

    root = tmp_path_factory.mktemp("embedded-default")
    shutil.copytree(REPO / "sample_cases", root / "scan")
    (root / "work").mkdir()
    write_config(root / "work", root / "scan")
    run = snakemake(root / "work", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "work"

"""Running the real workflow in a scratch folder, as a physicist's cron job would."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def write_config(workdir: Path, scan_dir: Path, *, calibrated: bool = True, **sections: dict) -> Path:
    """The site configuration of a test run. `calibrated`: the workdir gets a calibration record
    (config/calibration.yaml, the default place) with the shipped factors, recorded now, so the
    verdicts do not depend on the shipped record's age."""
    config: dict = {"paths": {"local": {"scan_directory": str(scan_dir)}}}
    config.update(sections)
    path = workdir / "test-config.yaml"
    path.write_text(yaml.safe_dump(config))
    if calibrated:
        write_calibration_record(workdir / "config" / "calibration.yaml")
    return path


def write_calibration_record(path: Path, days_old: float = 0.0) -> Path:
    """The shipped calibration entries, dated `days_old` days ago, as a record at `path`."""
    shipped = yaml.safe_load((REPO / "config" / "calibration.yaml").read_text())["entries"]
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days_old)
    entries = [{**entry, "date": when.isoformat(timespec="seconds")} for entry in shipped]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"entries": entries}, sort_keys=False))
    return path


def snakemake(
    workdir: Path, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess[str]:
    """`snakemake` with the repo's Snakefile and workflow profile, run in workdir."""
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", str(workdir / "test-config.yaml"), *args]
    return subprocess.run(
        command,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def full_log(run: subprocess.CompletedProcess[str]) -> str:
    """Snakemake's complete output of a run (rules, shell commands, reasons) from the log file
    whose path the console names at the run's start and end."""
    named = re.findall(r"Snakemake's full log: (\S+)", run.stderr)
    assert len(named) == 2 and named[0] == named[1], run.stderr[-3000:]
    return Path(named[0]).read_text()


def status_json(work: Path) -> dict:
    """`bin/mqi status --json --all` of a test work folder (its test-config.yaml), parsed."""
    run = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.ops.status", "--configfile", "test-config.yaml", "--json", "--all"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(run.stdout)


def tree_digest(root: Path) -> dict[str, str]:
    """Content hash and mtime of every file, to prove a tree was not modified."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def case_summaries(work: Path) -> dict[str, dict]:
    """Each finished case's case_summary.json, by case id."""
    return {
        p.parents[1].name: json.loads(p.read_text())
        for p in sorted((work / "data" / "cases").glob("*/intermediate/case_summary.json"))
    }


def sample_scan_with_failing_case(root: Path, patient_id: str) -> Path:
    """The bundled sample cases plus `zz_failing`, whose one beam is named FAILS: the stand-in
    engine (`standin_copies`) with MQI_STANDIN_FAULTS=FAILS:engine fails on it and on nothing else."""
    import shutil

    from tests import casegen

    scan = root / "scan"
    shutil.copytree(REPO / "sample_cases", scan)
    spec = casegen.CaseSpec(
        patient_id=patient_id, beams=[casegen.BeamSpec(1, "FAILS", [120.0], [[(0.0, 0.0), (10.0, 0.0)]])]
    )
    casegen.write_case(scan, "zz_failing", spec)
    return scan


def standin_copies(tmp_path: Path, faults: str = "") -> Path:
    """The stand-in executables of tests/standins (MOQUI's tps_env, mqi_interpreter: the real
    command contracts), run by this venv's Python, with the faults they are to show."""
    import shutil

    copies = tmp_path / "standins"
    shutil.copytree(REPO / "tests" / "standins", copies)
    for script in copies.iterdir():
        script.write_text(script.read_text().replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    (copies / "faults").write_text(faults)
    return copies

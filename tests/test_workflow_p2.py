"""Intake and P2 through real Snakemake runs: readiness, a broken case, reruns, read-only input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import casegen
from tests.workflow import full_log, snakemake, tree_digest, write_config


def _scan_dir(root: Path) -> Path:
    scan = root / "new_cases"
    casegen.write_case(scan, "good1")
    casegen.write_case(scan, "good2", casegen.standard_case("PSEUDO002", "G1"), reversed_order=True)
    casegen.write_case(scan, "waiting", ready=False)
    broken = casegen.write_case(scan, "broken")
    # The second layer's log of the first delivery never arrived.
    sorted(next(p for p in sorted(broken.iterdir()) if p.is_dir()).glob("*.ptn"))[1].unlink()
    (scan / "bad name").mkdir()
    return scan


def test_dry_run_real_run_and_resume(tmp_path: Path) -> None:
    scan = _scan_dir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)
    before = tree_digest(scan)

    dry = snakemake(work, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = dry.stdout + dry.stderr
    for case in ("good1", "good2", "broken"):
        assert f"data/cases/{case}/intermediate/intake.json" in planned
    assert "waiting" not in planned.replace("skipping", "")
    assert "skipping" in planned and "bad name" in planned
    # A dry run lists the jobs as Snakemake prints them (the physicists' preview).
    assert planned.count("rule intake:") == 3 and "wildcards: case_id=good1" in planned
    assert not (work / "data").exists()

    run = snakemake(work)
    output = run.stdout + run.stderr
    assert run.returncode != 0  # one case failed, and Snakemake says so
    for case in ("good1", "good2"):
        p2 = work / "data" / "cases" / case / "intermediate" / "moqui_csv"
        assert sorted(p.name for p in (p2 / "log").iterdir()) == ["1G180_TX", "2G90"]
        assert len(list(p2.rglob("*.csv"))) == 8
    broken_log = (work / "logs" / "broken" / "intake.log").read_text()
    assert "INTAKE FAILED for case broken" in broken_log
    assert "3 PTN files for 4 delivered layers" in broken_log
    # The console gives an account per case; the failure names case, step, reason and log.
    lines = output.splitlines()
    failed = [line for line in lines if line.startswith("case broken FAILED at intake: ")]
    assert len(failed) == 1 and "3 PTN files for 4 delivered layers" in failed[0], output
    assert failed[0].endswith("(log: logs/broken/intake.log)")
    assert any(re.search(r" case good1: simulate beam 2/2 started \((1G180_TX|2G90)\)$", x) for x in lines), output
    assert any(line.startswith("case good2 finished in ") for line in lines), output
    assert "2 finished, 1 failed (broken at intake)." in lines[-1]
    # Snakemake's job listing went to its log file, not to the console.
    assert len(lines) < 40 and "Shell command" not in output and "wildcards:" not in output
    detail = full_log(run)
    assert detail.count("localrule intake:") == 3 and "wildcards: case_id=good2" in detail
    assert "Shell command:" in detail and "3 PTN files for 4 delivered layers" in detail
    assert (work / "data" / "cases" / "broken" / "intermediate" / "state" / "failed.json").is_file()
    assert not (work / "data" / "cases" / "broken" / "intermediate" / "moqui_csv").exists()

    again = snakemake(work)
    assert again.returncode == 0, again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr
    assert "skipping case broken: intake" in again.stdout + again.stderr

    # A new ready case (the waiting one becomes ready): only it is processed.
    (scan / "waiting" / "_CASE_READY").write_text("")
    later = snakemake(work)
    assert later.returncode == 0, later.stderr
    log = full_log(later)
    assert "wildcards: case_id=waiting" in log
    assert "case_id=good1" not in log and "case_id=good2" not in log
    assert (work / "data" / "cases" / "waiting" / "intermediate" / "case_summary.json").is_file()

    # Nothing the sender delivered was modified, moved or deleted (the marker is ours to add).
    after = tree_digest(scan)
    after.pop("waiting/_CASE_READY")
    assert after == before


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ("interpreter", {"csv_layout": "tabs"}, "csv_layout"),
        ("application", {"max_attempts": "four"}, "max_attempts"),
        # Removed keys are refused by name, not silently ignored (they were read by nothing).
        ("application", {"max_workers": 4}, "max_workers"),
        ("rooms", {"G1": {"timegain_ms": 0.06}}, "x_offset"),
    ],
)
def test_invalid_config_stops_before_any_job(tmp_path: Path, section: str, value: dict, key: str) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "c1")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, **{section: value})
    run = snakemake(work)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "Error validating config" in text and key in text
    assert not (work / "data").exists() and not (work / "logs").exists()


def test_missing_scan_directory_is_named(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, tmp_path / "nowhere")
    run = snakemake(work, "--dry-run")
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "scan_directory" in text and "nowhere" in text

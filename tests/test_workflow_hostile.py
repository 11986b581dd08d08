"""Hostile cases through real Snakemake runs (issue 10): a case named `-dash`, a case marked ready
before its logs arrived, a declared plan-mode case, a flagged log, and bad path/YAML settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from mqi_communicator.formats.rtdose_read import read_rtdose_dose
from tests import casegen
from tests.workflow import full_log, snakemake, write_config


def _small_spec(patient_id: str) -> casegen.CaseSpec:
    spots = [casegen.grid_spots(10.0, 10.0), casegen.grid_spots(5.0, 5.0)]
    # Both beams in one geometry, so the plan sum (RD_PLAN) is written and checked too.
    return casegen.CaseSpec(
        patient_id=patient_id,
        beams=[
            casegen.BeamSpec(2, "1G180:TX", [150.0, 145.0], spots, gantry_angle=180.0),
            casegen.BeamSpec(3, "2G90", [140.0, 135.0], spots, gantry_angle=180.0),
        ],
    )


def _summary(work: Path, case: str) -> dict:
    return json.loads((work / "data" / "cases" / case / "intermediate" / "case_summary.json").read_text())


def _rtdose(work: Path, case: str, name: str) -> pydicom.Dataset:
    return pydicom.dcmread(work / "data" / "cases" / case / "dicom" / name)


def test_dash_late_planned_and_flagged_cases(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "-dash", _small_spec("DASH"))
    shutil.copytree(scan / "-dash", scan / "good")  # the same case under a plain name
    casegen.write_case(scan, "planned", _small_spec("PLANNED"), deliveries=False)
    late = casegen.write_case(scan, "late", _small_spec("LATE"))
    shutil.rmtree(sorted(p for p in late.iterdir() if p.is_dir())[1])  # beam 3's logs not here yet
    flagged = casegen.write_case(scan, "flagged", _small_spec("FLAGGED"))
    layer2 = sorted(sorted(p for p in flagged.iterdir() if p.is_dir())[0].glob("*.ptn"))[1]
    layer2.write_bytes(b"")  # an empty log for layer 2 of beam 2
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, log_checks={"on_failure": "flag"})

    # Finding 6, the wrong result: the old `--case {wildcards.case_id}` form is read as an option.
    old_form = [sys.executable, "-m", "mqi_communicator.report", "summary", "--case", "-dash"]
    old_form += ["--records", "r", "--rtdoses", "d", "--plan-dose", "p", "--output", "o"]
    refused = subprocess.run(old_form, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "--case: expected one argument" in refused.stderr

    run = snakemake(work, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # Finding 6: `-dash` finishes, with the same dose as the same case under a plain name.
    dash, good = _summary(work, "-dash"), _summary(work, "good")
    assert dash["case_id"] == "-dash" and dash["labels"] == [] == good["labels"]
    assert dash["mode"] == "logs"
    for name in ("RD_PLAN.dcm", "RD_1G180_TX.dcm", "RD_2G90.dcm"):
        assert (
            read_rtdose_dose(work / "data/cases/-dash/dicom" / name).dose
            == read_rtdose_dose(work / "data/cases/good/dicom" / name).dose
        ).all()
    assert "[" not in str(_rtdose(work, "good", "RD_PLAN.dcm").SeriesDescription)

    # Finding 2: the late case waits, and says so; nothing of it is computed.
    assert "case late: waiting for deliveries of beam 3 ('2G90'): no delivery" in output
    assert not (work / "data" / "cases" / "late").exists()

    # Plan mode only as declared, and labelled in the RT Dose and the summary.
    planned = _summary(work, "planned")
    assert planned["mode"] == "plan" and planned["labels"] == ["PLAN-BASED"]
    for name in ("RD_PLAN.dcm", "RD_2G90.dcm"):
        ds = _rtdose(work, "planned", name)
        assert ds.DoseComment.startswith("[PLAN-BASED]")
        assert "[PLAN-BASED]" in ds.SeriesDescription and "[PLAN-BASED]" in ds.ImageComments

    # Finding 3 with on_failure flag: computed, and labelled everywhere it is shown.
    flagged_summary = _summary(work, "flagged")
    assert flagged_summary["labels"] == ["FLAGGED"]
    assert any(str(layer2) in f and "layer 2" in f and "empty" in f for f in flagged_summary["flags"])
    assert _rtdose(work, "flagged", "RD_PLAN.dcm").DoseComment.startswith("[FLAGGED]")
    assert "FLAGGED" in (work / "logs" / "flagged" / "intake.log").read_text()
    table = (work / "data/cases/flagged/intermediate/report/beams.csv").read_text().splitlines()
    assert table[0].startswith("beam,") and table[0].endswith(",labels")
    assert len(table) == 3 and all(row.endswith(",FLAGGED") for row in table[1:])
    planned_table = (work / "data/cases/planned/intermediate/report/beams.csv").read_text().splitlines()
    assert len(planned_table) == 3 and all(row.endswith(",PLAN-BASED") for row in planned_table[1:])

    # The wait ends: the late case fails naming the missing beam; the others are left alone.
    old = time.time() - 3 * 3600
    os.utime(late / "_CASE_READY", (old, old))
    again = snakemake(work, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode != 0
    assert "incomplete: beam 3 ('2G90'): no delivery" in output
    failed = json.loads((work / "data" / "cases" / "late" / "intermediate" / "state" / "failed.json").read_text())
    assert failed["kind"] == "permanent" and failed["transient"] is False  # the case's own: waits for a change
    detail = full_log(again)
    assert "case_id=late" in detail and "case_id=good" not in detail and "case_id=-dash" not in detail


def _dry_run(tmp_path: Path, **local: str) -> str:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "c1", _small_spec("C1"))
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, paths={"local": {"scan_directory": str(scan), **local}})
    run = snakemake(work, "--dry-run")
    assert run.returncode != 0
    return run.stdout + run.stderr


def test_empty_scan_directory_is_refused(tmp_path: Path) -> None:
    text = _dry_run(tmp_path, scan_directory="")
    assert "paths.local.scan_directory is empty" in text


@pytest.mark.parametrize("key", ["processing_directory", "final_dicom_directory"])
def test_outputs_inside_the_scan_folder_are_refused(tmp_path: Path, key: str) -> None:
    text = _dry_run(tmp_path / "t", **{key: str(tmp_path / "t" / "scan" / "out" / "{case_id}")})
    assert f"paths.local.{key}" in text and "outputs must be outside the scan folder" in text
    assert "CyclicGraphException" not in text


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    (work / "config" / "config.yaml").write_text("paths:\n  local:\n    scan_directory: scan\n  bad: [1, 2\n")
    run = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(Path(__file__).parents[1] / "Snakefile"), "-n"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode != 0
    assert "config/config.yaml, line 5, column" in run.stdout + run.stderr

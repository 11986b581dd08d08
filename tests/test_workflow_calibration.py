"""Commissioning the absolute dose: the reference fields run through the real workflow without a
calibration (no PASS: "dose scale not verified"), `bin/mqi calibrate` derives the factor from
their TPS dose or from a measured point, and the factor reproduces the shipped record (which is
what the demo's verdicts rest on). A calibration then lets the same case PASS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from mqi_communicator.qa import calibration
from tests import reference_field
from tests.workflow import REPO, snakemake, write_config

MQI = str(REPO / "bin" / "mqi")


def calibrate(work: Path, case: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MQI, "calibrate", case, "--by", "Test Physicist", "--configfile", "test-config.yaml", *extra],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )


def qa_of(work: Path, case: str) -> dict:
    return json.loads((work / "data" / "cases" / case / "intermediate" / "qa" / "qa.json").read_text())


@pytest.fixture(scope="module")
def uncalibrated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calibration")
    for room in ("G1", "G2"):
        reference_field.write_reference_case(root / "scan", room)
    work = root / "work"
    work.mkdir()
    write_config(work, root / "scan", calibrated=False)
    run = snakemake(work)
    assert run.returncode == 0, run.stderr[-3000:]
    return work


def test_without_calibration_no_dose_passes(uncalibrated_run: Path) -> None:
    for room in ("G1", "G2"):
        qa = qa_of(uncalibrated_run, f"REF_{room}")
        assert qa["verdict"] == "NOT ASSESSED" and "DOSE SCALE NOT VERIFIED" in qa["labels"]
        (beam,) = qa["beams"]
        assert beam["dose"]["reasons"][0].startswith("dose scale not verified: our dose is RELATIVE")
        rtdose = pydicom.dcmread(uncalibrated_run / "data" / "cases" / f"REF_{room}" / "dicom" / "RD_REF.dcm")
        assert rtdose.DoseUnits == "RELATIVE"
    summary = json.loads(
        (uncalibrated_run / "data" / "cases" / "REF_G2" / "intermediate" / "case_summary.json").read_text()
    )
    assert summary["qa"]["verdict"] == "NOT ASSESSED"


def test_calibrate_reproduces_the_shipped_record_and_then_the_case_passes(uncalibrated_run: Path) -> None:
    work = uncalibrated_run
    shipped = {(e.engine, e.room): e for e in calibration.read_record(REPO / "config" / "calibration.yaml")}
    record = work / "config" / "calibration.yaml"
    for room in ("G1", "G2"):
        done = calibrate(work, f"REF_{room}")
        assert done.returncode == 0, done.stderr
        assert f"builtin {room}:" in done.stdout and str(record) in done.stdout
        entry = calibration.current(record, "builtin", room)
        assert entry is not None and entry.set_by == "Test Physicist" and entry.method == "tps"
        assert "RD_TPS_2.dcm sha256" in entry.source and "REF_Dose.raw sha256" in entry.source
        # The shipped record was derived the same way: if the engine changes, it must be redone.
        assert entry.gy_per_unit == pytest.approx(shipped[("builtin", room)].gy_per_unit, rel=5e-3)
    # A measured point dose (here: the TPS dose at the isocentre) gives the same factor.
    zero = calibrate(work, "REF_G2", "--measured-gy", "0.0", "--beam", "2", "--dry-run")
    assert zero.returncode == 2 and "--measured-gy must be a dose > 0 Gy, not 0" in zero.stderr
    tps_plane = pydicom.dcmread(work.parent / "scan" / "REF_G2" / "RD_TPS_2.dcm")
    centre = float(tps_plane.pixel_array[tps_plane.Rows // 2, tps_plane.Columns // 2]) * float(
        tps_plane.DoseGridScaling
    )
    measured = calibrate(work, "REF_G2", "--measured-gy", f"{centre:.6g}", "--beam", "2", "--dry-run")
    assert measured.returncode == 0, measured.stderr
    assert "[dry run, not recorded]" in measured.stdout
    factor = float(measured.stdout.split(":")[1].split()[0])
    assert factor == pytest.approx(shipped[("builtin", "G2")].gy_per_unit, rel=0.02)
    assert len(calibration.read_record(record)) == 2  # the dry run recorded nothing
    # With the calibration, the next run writes Gy and the verdict can PASS: reprocess one case.
    again = subprocess.run(
        [MQI, "reprocess", "REF_G2", "--configfile", "test-config.yaml"], cwd=work, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    run = snakemake(work)
    assert run.returncode == 0, run.stderr[-3000:]
    qa = qa_of(work, "REF_G2")
    assert qa["verdict"] == "PASS" and qa["labels"] == [], qa["beams"][0]["dose"]["reasons"]
    assert qa["calibration"]["state"] == "current" and qa["calibration"]["set_by"] == "Test Physicist"
    rtdose = pydicom.dcmread(work / "data" / "cases" / "REF_G2" / "dicom" / "RD_REF.dcm")
    assert rtdose.DoseUnits == "GY"


def test_calibrate_refuses_what_it_cannot_derive(uncalibrated_run: Path) -> None:
    missing = calibrate(uncalibrated_run, "NO_SUCH_CASE")
    assert missing.returncode == 1 and "no intake record" in missing.stderr
    no_beam = calibrate(uncalibrated_run, "REF_G1", "--measured-gy", "1.0", "--beam", "9")
    assert no_beam.returncode == 1 and "no simulated beam number 9" in no_beam.stderr

"""The embedded default end to end: sample cases -> RT Dose + report, axis mapping, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.formats.plan import find_plan
from mqi_communicator.formats.rtdose_read import read_rtdose_dose
from tests import casegen
from tests.workflow import REPO, SNAKEMAKE, full_log, snakemake, standin_copies, write_config


def _asymmetric_case(scan: Path) -> Path:
    """One beam whose two spots, (+60, 0) and (0, +30) mm, have no mirror image."""
    spec = casegen.CaseSpec(
        patient_id="ASYM",
        beams=[casegen.BeamSpec(1, "ASYM:1", [150.0], [[(60.0, 0.0), (0.0, 30.0)]], spot_mu=0.05)],
        isocenter_mm=(0.0, 30.0, 0.0),
    )
    return casegen.write_case(scan, "asym", spec, samples_per_spot=80)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dose")
    scan = root / "new_cases"
    shutil.copytree(REPO / "sample_cases", scan)
    _asymmetric_case(scan)
    work = root / "work"
    work.mkdir()
    write_config(work, scan)
    run = snakemake(work, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work


def _dose_at(image, x_mm: float, z_mm: float) -> float:
    col = int(np.argmin(np.abs(image.col_mm - x_mm)))
    row = int(np.argmin(np.abs(image.row_mm - z_mm)))
    return float(image.dose[0, row - 2 : row + 3, col - 2 : col + 3].max())


def test_rt_doses_reference_the_plan(finished_run: Path) -> None:
    for case in ("case001_G2", "case002_G1", "case003_plan_only"):
        plan = pydicom.dcmread(find_plan(REPO / "sample_cases" / case))
        dicom = finished_run / "data" / "cases" / case / "dicom"
        # Gantry 180 and 90: different beam frames, so no plan sum (the asym case has one).
        assert sorted(p.name for p in dicom.iterdir()) == ["RD_1G180_TX.dcm", "RD_2G90.dcm"]
        beams, frames = {}, set()
        for path in sorted(dicom.iterdir()):
            ds = pydicom.dcmread(path)
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2" and ds.Modality == "RTDOSE"
            for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
                assert ds[keyword].value == plan[keyword].value
            # The default beam frame is a phantom, not the patient: a frame of its own
            # (docs/rtdose-frames.md), one per beam geometry (gantry 180 and 90 differ).
            assert ds.FrameOfReferenceUID != plan.FrameOfReferenceUID and ds.PositionReferenceIndicator == "PHANTOM"
            frames.add(ds.FrameOfReferenceUID)
            ref = ds.ReferencedRTPlanSequence[0]
            assert ref.ReferencedSOPInstanceUID == plan.SOPInstanceUID
            # The test run has the shipped calibration (tests/workflow.py): doses in Gy.
            assert ds.DoseUnits == "GY" and "not Monte Carlo" in str(ds.get("DoseComment", ""))
            assert (ds.Rows, ds.Columns) == (400, 400)
            assert ds.DoseSummationType == "BEAM_SESSION"  # one delivered session of the beam
            number = ref.ReferencedFractionGroupSequence[0].ReferencedBeamSequence[0].ReferencedBeamNumber
            beams[path.name] = number
        assert beams == {"RD_1G180_TX.dcm": 2, "RD_2G90.dcm": 3}
        assert len(frames) == 2
        summary = json.loads(
            (finished_run / "data" / "cases" / case / "intermediate" / "case_summary.json").read_text()
        )
        assert [b["beam_number"] for b in summary["beams"]] == [2, 3]
        assert summary["plan_dose"]["rt_dose"] is None
        # The sample cases carry independent TPS doses: each gets a QA verdict and sheet.
        assert summary["qa"]["verdict"] == "PASS"
        assert (finished_run / "data" / "cases" / case / "intermediate" / "qa" / "qa_sheet.html").is_file()


def test_plan_sum_of_beams_sharing_one_geometry(finished_run: Path) -> None:
    dicom = finished_run / "data" / "cases" / "asym" / "dicom"
    plan_dose = read_rtdose_dose(dicom / "RD_PLAN.dcm").dose
    beam = read_rtdose_dose(dicom / "RD_ASYM_1.dcm").dose
    assert np.abs(plan_dose - beam).max() <= 1e-6 * beam.max()
    plan_sum, beam_ds = pydicom.dcmread(dicom / "RD_PLAN.dcm"), pydicom.dcmread(dicom / "RD_ASYM_1.dcm")
    assert plan_sum.FrameOfReferenceUID == beam_ds.FrameOfReferenceUID  # one phantom, one frame
    assert (plan_sum.DoseSummationType, beam_ds.DoseSummationType) == ("FRACTION_SESSION", "BEAM_SESSION")


def test_axis_and_sign_mapping_from_logs_to_rt_dose(finished_run: Path) -> None:
    """Spots at MOQUI (x, y) = (+60, 0) and (0, +30) land at patient (x, z) = (+60, 0), (0, +30)."""
    image = read_rtdose_dose(finished_run / "data" / "cases" / "asym" / "dicom" / "RD_ASYM_1.dcm")
    peak = float(image.dose.max())
    for x, z in ((60.0, 0.0), (0.0, 30.0)):
        assert _dose_at(image, x, z) > 0.8 * peak
    for x, z in ((-60.0, 0.0), (0.0, -30.0), (30.0, 0.0), (0.0, 60.0)):
        assert _dose_at(image, x, z) < 0.05 * peak


def test_report_and_nothing_left_to_do(finished_run: Path) -> None:
    again = snakemake(finished_run, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr
    # A real run with nothing to do says so on the console; Snakemake's own console on request.
    idle = snakemake(finished_run)
    assert idle.returncode == 0 and "Nothing to be done" in idle.stderr, idle.stderr
    assert idle.stderr.splitlines()[-1].startswith("mqi: run ended after ") and "nothing to do." in idle.stderr
    assert "Building DAG of jobs" not in idle.stderr and "Building DAG of jobs" in full_log(idle)
    whole = snakemake(finished_run, env={"SNAKEMAKE_LOGGER_MQI_CONSOLE": "snakemake"})
    assert whole.returncode == 0 and "Building DAG of jobs" in whole.stderr and "mqi: run" not in whole.stderr
    report = snakemake(finished_run, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-2000:]
    html = (finished_run / "report.html").read_text(errors="replace")
    for needle in ("dose_1G180_TX.png", "beams.csv", "Dose maps", "not Monte Carlo", "QA sheets", "qa_trend.png"):
        assert needle in html
    table = (finished_run / "data" / "cases" / "case001_G2" / "intermediate" / "report" / "beams.csv").read_text()
    assert table.splitlines()[0].startswith("beam,beam_number,max_dose,units,engine")
    assert len(table.splitlines()) == 3


def test_killed_during_simulate_resumes_without_redoing_finished_beams(tmp_path: Path) -> None:
    scan = tmp_path / "new_cases"
    casegen.write_case(scan, "c1")
    work = tmp_path / "work"
    work.mkdir()
    # Each engine run (the stand-in tps_env) takes 4 s; one GPU, so the beams run one after the other.
    write_config(work, scan, executables={"moqui": str(standin_copies(tmp_path, "c1 sleep 4\n") / "tps_env_faulty")})
    raw = work / "data" / "cases" / "c1" / "raw"
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", str(work / "test-config.yaml")]
    env = dict(os.environ)
    process = subprocess.Popen(
        command, cwd=work, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = list(raw.glob("*.simulate.json")) if raw.is_dir() else []
            running = [
                p for p in (work / "logs" / "c1").glob("simulate_*.log") if "stand-in: sleeping" in p.read_text()
            ]
            if len(done) == 1 and len(running) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("never saw one beam finished while the other was simulating")
        finished = done[0]
        finished_mtime = finished.stat().st_mtime_ns
        os.killpg(process.pid, signal.SIGKILL)  # power cut: Snakemake and the engine die at once
    finally:
        process.wait(30)
    assert not (work / "data" / "cases" / "c1" / "intermediate" / "case_summary.json").exists()

    unlock = snakemake(work, "--unlock")
    assert unlock.returncode == 0
    rerun = snakemake(work, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = full_log(rerun)
    assert finished.stat().st_mtime_ns == finished_mtime  # the finished beam was not redone
    finished_beam = finished.name.removesuffix(".simulate.json")
    simulated = re.findall(r"^(?:local)?rule simulate:\n((?:    .*\n)+)", log, re.MULTILINE)  # each job's block
    assert len(simulated) == 1 and "wildcards: case_id=c1, beam=" in simulated[0], log[-3000:]
    assert f"beam={finished_beam}" not in simulated[0]
    assert (work / "data" / "cases" / "c1" / "intermediate" / "case_summary.json").is_file()

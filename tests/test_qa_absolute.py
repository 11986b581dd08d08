"""A PASS means the dose is right: no PASS without a current calibration, no comparison with a TPS
dose whose geometry is not proven (another depth, the patient's frame, a grid that does not cover
ours, several beams, a whole-course dose taken for one fraction). Case folders from
tests/casegen.py, TPS doses from the independent tests/qa_gen.py, delivered RT Doses from the
pipeline's own writer (as in tests/test_qa_verdict.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator import settings
from mqi_communicator.qa import calibration, sheet
from tests import qa_gen
from tests.test_qa_verdict import assess, beam, current_calibration, delivered_doses, make_case, plan_of

UNVERIFIED = "DOSE SCALE NOT VERIFIED"


def test_uncalibrated_run_gives_no_pass_and_says_why_everywhere(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    rtdoses = delivered_doses(case, tmp_path / "out")  # in Gy, and exactly the TPS dose
    result = assess(case, rtdoses, config, calibration={})  # {}: no calibration entry
    assert result["verdict"] == "NOT ASSESSED"
    assert UNVERIFIED in result["labels"]
    assert result["calibration"]["state"] == "missing"
    for b in result["beams"]:
        assert b["dose"]["verdict"] == "NOT ASSESSED"
        assert b["dose"]["reasons"][0].startswith("dose scale not verified: no calibration")
        assert b["dose"]["gamma_primary"]["pass_rate_percent"] == 100.0  # it was compared, only not trusted
    page = sheet.render(result, {})
    assert f"[{UNVERIFIED}]" in page and "no calibration of this engine and room" in page


def test_stale_calibration_gives_no_pass(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    result = assess(case, delivered_doses(case, tmp_path / "out"), config, calibration=current_calibration(400))
    assert result["verdict"] == "NOT ASSESSED" and result["calibration"]["state"] == "stale"
    assert "400 days old" in beam(result, "F1")["dose"]["reasons"][0]
    fresh = assess(case, delivered_doses(case, tmp_path / "out2"), config)
    assert fresh["verdict"] == "PASS" and fresh["labels"] == [] and fresh["calibration"]["state"] == "current"
    assert "calibration of" in sheet.render(fresh, {}) and "Test Physicist" in sheet.render(fresh, {})


def test_a_failing_dose_stays_fail_without_calibration(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    result = assess(case, delivered_doses(case, tmp_path / "out", swap=True), config, calibration={})
    assert beam(result, "F1")["dose"]["verdict"] == "FAIL"  # worse than NOT ASSESSED, so it stands


def _with_fractions(case: Path, fractions: int, beam_dose_per_fraction: dict[int, float] | None) -> None:
    path, plan = plan_of(case)
    group = plan.FractionGroupSequence[0]
    group.NumberOfFractionsPlanned = fractions
    for ref in group.ReferencedBeamSequence:
        if beam_dose_per_fraction and int(ref.ReferencedBeamNumber) in beam_dose_per_fraction:
            ref.BeamDose = f"{beam_dose_per_fraction[int(ref.ReferencedBeamNumber)]:.6g}"
    plan.save_as(path, enforce_file_format=True)


def _tps_at_iso(case: Path, number: int) -> float:
    _, plan = plan_of(case)
    x_rel, z_rel, _, _ = qa_gen.tps_grid(plan)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, number), "G2", x_rel, z_rel)
    return float(plane[z_rel.size // 2, x_rel.size // 2])


def test_whole_course_tps_dose_gives_no_pass(tmp_path: Path, config: dict) -> None:
    """30 fractions; the TPS exported the whole course (30 x one fraction) and the site said its
    exports are per fraction: the plan's BeamDose exposes it, and even without BeamDose the
    absolute comparison fails."""
    case = make_case(tmp_path, tps=False)
    _with_fractions(case, 30, {2: _tps_at_iso(case, 2), 3: _tps_at_iso(case, 3)})
    _, plan = plan_of(case)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan)
    for number in (2, 3):
        course = 30 * qa_gen.tps_plane(qa_gen.plan_spots(plan, number), "G2", x_rel, z_rel)
        qa_gen.write_tps_dose(case / f"RD_TPS_{number}.dcm", plan, course, x_abs, z_abs, beam_number=number)
    rtdoses = delivered_doses(case, tmp_path / "out")  # one fraction, in Gy
    per_fraction = copy.deepcopy(config)
    per_fraction["qa"]["tps_dose_per"] = "fraction"
    result = assess(case, rtdoses, per_fraction)
    f1 = beam(result, "F1")
    assert f1["dose"]["verdict"] == "ERROR" and result["verdict"] == "ERROR"
    assert "fraction scaling" in f1["dose"]["reasons"][0]
    assert "close to NumberOfFractionsPlanned 30" in f1["dose"]["reasons"][0]
    # The same export read as the whole plan's dose (the default) is divided by 30: PASS.
    assert assess(case, rtdoses, config)["verdict"] == "PASS"
    # Without BeamDose (Type 3) the mismatch is still no PASS: the absolute comparison fails.
    path, plan = plan_of(case)
    for ref in plan.FractionGroupSequence[0].ReferencedBeamSequence:
        if "BeamDose" in ref:
            del ref.BeamDose
    plan.save_as(path, enforce_file_format=True)
    result = assess(case, rtdoses, per_fraction)
    assert beam(result, "F1")["dose"]["verdict"] == "FAIL"
    assert beam(result, "F1")["dose"]["mean_dose_difference_percent"] < -90


def test_tps_plane_from_another_depth_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path, tps=False)
    _, plan = plan_of(case)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan)
    iso_y = float(plan.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition[1])
    for number in (2, 3):
        plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, number), "G2", x_rel, z_rel)
        y = iso_y + 100.0 if number == 2 else iso_y + 0.4
        qa_gen.write_tps_dose(
            case / f"RD_TPS_{number}.dcm", plan, plane, x_abs, z_abs, beam_number=number, plane_y_mm=y
        )
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    f1 = beam(result, "F1")
    assert f1["dose"]["verdict"] == "ERROR" and "gamma_primary" not in f1["dose"]
    assert f1["dose"]["reasons"] == [
        "the TPS plane lies at y = 130 mm but ours at y = 30 mm (+100.0 mm, more than 0.5 mm): not the same plane "
        "(another depth or phantom position)"
    ]
    assert beam(result, "F2")["dose"]["verdict"] == "PASS"  # 0.4 mm: within the tolerance


@pytest.mark.parametrize("volume", [False, True], ids=["plane", "patient CT volume"])
def test_tps_dose_in_the_plans_own_frame_is_a_patient_dose_and_refused(
    tmp_path: Path, config: dict, volume: bool
) -> None:
    case = make_case(tmp_path, frame="plan", volume=volume)
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    for b in result["beams"]:
        assert b["dose"]["verdict"] == "ERROR" and "gamma_primary" not in b["dose"]
        reason = b["dose"]["reasons"][0]
        assert "a dose on the patient's images (its FrameOfReferenceUID is the plan's" in reason
        assert "export the verification dose on the phantom" in reason
    assert result["verdict"] == "ERROR"


def test_tps_dose_without_a_frame_of_reference_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    path = case / "RD_TPS_2.dcm"
    ds = pydicom.dcmread(path)
    del ds.FrameOfReferenceUID
    ds.save_as(path, enforce_file_format=True)
    f1 = beam(assess(case, delivered_doses(case, tmp_path / "out"), config), "F1")
    assert f1["dose"]["verdict"] == "ERROR" and "no FrameOfReferenceUID" in f1["dose"]["reasons"][0]


def test_tps_grid_that_does_not_cover_our_dose_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path, tps=False)
    _, plan = plan_of(case)
    iso = [float(v) for v in plan.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition]
    rel = np.arange(-12.0, 12.1, 2.0)  # 24 mm wide; beam F1's field is 40 mm wide
    for number in (2, 3):
        plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, number), "G2", rel, rel)
        qa_gen.write_tps_dose(
            case / f"RD_TPS_{number}.dcm", plan, plane, rel + iso[0], rel + iso[2], beam_number=number
        )
    f1 = beam(assess(case, delivered_doses(case, tmp_path / "out"), config), "F1")
    assert f1["dose"]["verdict"] == "ERROR"
    assert f1["dose"]["reasons"][0].startswith("the TPS grid (x -13..13 mm, z -13..13 mm) does not cover our dose")


def test_beam_dose_referencing_several_beams_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    path = case / "RD_TPS_2.dcm"
    ds = pydicom.dcmread(path)
    group = ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence[0]
    extra = pydicom.Dataset()
    extra.ReferencedBeamNumber = 3
    group.ReferencedBeamSequence.append(extra)
    ds.save_as(path, enforce_file_format=True)
    f1 = beam(assess(case, delivered_doses(case, tmp_path / "out"), config), "F1")
    assert f1["dose"]["verdict"] == "ERROR"
    assert (
        "a BEAM dose must reference one beam; RD_TPS_2.dcm (beams [2, 3]) references several"
        in (f1["dose"]["reasons"][0])
    )


def test_calibration_record_keeps_history_and_the_newest_is_current(tmp_path: Path) -> None:
    record = tmp_path / "calibration.yaml"
    assert calibration.current(record, "builtin", "G2") is None
    old = calibration.Calibration("builtin", "G2", 1.5e-3, "2026-01-05T10:00:00+00:00", "A", "tps", "ref 1")
    new = calibration.Calibration("builtin", "G2", 1.6e-3, "2026-11-05T10:00:00+00:00", "B", "measured", "ref 2")
    other = calibration.Calibration("moqui", "G2", 9.0, "2026-12-01T10:00:00+00:00", "C", "tps", "ref 3")
    for entry in (old, new, other):
        calibration.append(record, entry)
    assert calibration.read_record(record) == [old, new, other]
    assert calibration.current(record, "builtin", "G2") == new
    assert calibration.current(record, "builtin", "G1") is None
    text = record.read_text()
    calibration.append(record, old)  # appending keeps what was there, byte for byte
    assert record.read_text().startswith(text) and len(calibration.read_record(record)) == 4
    record.write_text(
        "entries:\n- {engine: builtin, room: G2, gy_per_unit: -1, date: x, set_by: a, method: tps, source: s}\n"
    )
    with pytest.raises(calibration.CalibrationError, match=r"entry 1: gy_per_unit must be a number > 0"):
        calibration.read_record(record)


def test_dose_scale_in_the_moqui_template_is_refused(config: dict) -> None:
    assert settings.template_problems(config) == []
    doubled = copy.deepcopy(config)
    doubled["simulation"]["template"]["DoseScaleFactor"] = 2.0
    (problem,) = settings.template_problems(doubled)
    assert "simulation.template.DoseScaleFactor would scale the dose a second time" in problem
    with pytest.raises(ValueError, match="dose_scale_factor"):
        settings.validate({**copy.deepcopy(config), "simulation": {"dose_scale_factor": 0.5}})


def test_qa_json_carries_labels_engine_calibration_and_fraction(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    assert result["engine"] == "test engine"
    assert result["fraction_assessed"]["fraction"] == 1 and result["fraction_assessed"]["source"] == "logs"
    assert result["fraction_assessed"]["last_irradiation"] == "2026110209050000"
    assert json.loads(json.dumps(result))["calibration"]["set_by"] == "Test Physicist"
    assert "fraction 1 of 1 delivered (logs of 2026110209050000)" in sheet.render(result, {})

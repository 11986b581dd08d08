"""Patient QA verdicts on real case folders: PTN logs from tests/casegen.py, TPS RT Doses from the
independent tests/qa_gen.py, delivered RT Doses written by the pipeline's own writer from the
(perturbed) delivered spots; every ERROR / NOT ASSESSED path with its reason."""

from __future__ import annotations

import copy
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.formats import ptn, raw_dose
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.qa import run as qa_run
from mqi_communicator.qa.tps_dose import TpsDoseProblem, check_header, find_tps_doses, load_tps_plane, match
from mqi_communicator.rtdose import writer as rtdose
from tests import casegen, qa_gen

REPO = Path(__file__).resolve().parents[1]
RAW_AXIS = raw_dose.PLANE_2CM.centres("x")  # MOQUI x and y of the 2 cm plane (relative to iso)


def spec() -> casegen.CaseSpec:
    """Two different beams (so a swap shows): a centred 40 mm field and a smaller, offset one."""
    layers = 3
    return casegen.CaseSpec(
        patient_id="QA001",
        room="G2",
        beams=[
            casegen.BeamSpec(1, "SETUP", [], [], setup=True),
            casegen.BeamSpec(2, "F1", [150.0 - 5 * k for k in range(layers)], [casegen.grid_spots(20, 5.0)] * layers),
            casegen.BeamSpec(
                3,
                "F2",
                [140.0 - 5 * k for k in range(layers)],
                [[(x + 10.0, y - 5.0) for x, y in casegen.grid_spots(10, 5.0)]] * layers,
            ),
        ],
    )


def make_case(tmp_path: Path, *, tps: bool = True, **tps_options: object) -> Path:
    case = casegen.write_case(tmp_path / "scan", "qa_case", spec(), samples_per_spot=20, off_samples=20)
    if tps:
        qa_gen.write_case_tps_doses(case, "G2", **tps_options)
    return case


def plan_of(case: Path) -> tuple[Path, pydicom.Dataset]:
    path = case / "RP.qa_case.dcm"
    return path, pydicom.dcmread(path)


def delivered_doses(
    case: Path, out: Path, *, calibrated: bool = True, swap: bool = False, **perturb: object
) -> list[Path]:
    """What the engine would deliver: each beam's plane from its (perturbed) spots, written as
    the pipeline writes RT Dose (MOQUI raw order: rows = y, columns = x)."""
    plan_path, plan = plan_of(case)
    written = []
    for number in (2, 3):
        source = {2: 3, 3: 2}[number] if swap else number
        plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, source), "G2", RAW_AXIS, RAW_AXIS, **perturb)  # type: ignore[arg-type]
        written.append(
            rtdose.write_rtdose(
                plane[np.newaxis],
                raw_dose.PLANE_2CM,
                plan_path,
                out / f"RD_{number}.dcm",
                beam_number=number,
                engine_label="test engine",
                calibrated=calibrated,
            )
        )
    return written


def current_calibration(days_old: float = 1.0) -> dict:
    """A calibration entry as `bin/mqi calibrate` records it, set `days_old` days ago."""
    date = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days_old)
    return {
        "engine": "builtin",
        "room": "G2",
        "gy_per_unit": 1.0,
        "date": date.isoformat(timespec="seconds"),
        "set_by": "Test Physicist",
        "method": "tps",
        "source": "reference case REF (test)",
    }


def assess(case: Path, rtdoses: list[Path], config: dict, calibration: dict | None = None) -> dict:
    manifest = build_manifest(case, config)
    entry = current_calibration() if calibration is None else calibration or None
    result, figures = qa_run.assess(manifest, rtdoses, config, "test engine", entry)
    assert set(figures) <= {"F1", "F2"}
    return result


def beam(result: dict, name: str) -> dict:
    return next(b for b in result["beams"] if b["name"] == name)


def perturb_logs(
    case: Path, beam_number: int, *, layer: int | None = None, dx_mm: float = 0.0, mu_scale: float = 1.0
) -> None:
    """Edit the delivery's PTN logs: shift one layer's beam-on positions, or scale every dose1."""
    folder = next(p.parent for p in case.rglob("PlanInfo.txt") if f"DICOM_BEAM_NUMBER,{beam_number}" in p.read_text())
    calibration = casegen.ROOMS["G2"]
    for index, path in enumerate(sorted(folder.glob("*.ptn")), start=1):
        rows = ptn.read_ptn(path).astype(np.int64)
        on = (rows[:, 7] & ptn.FLAG_ACTUAL_BEAM_ON) != 0
        if layer == index:
            rows[on, 0] += round(dx_mm / (calibration.x_gain_mm * calibration.x_sign))  # plan-frame dx
        rows[:, 4] = np.rint(rows[:, 4] * mu_scale)
        ptn.write_ptn(path, rows)


def test_unperturbed_delivery_passes(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    assert result["verdict"] == "PASS", json.dumps(result["beams"], indent=1, default=str)[:3000]
    for b in result["beams"]:
        assert b["dose"]["comparison"] == "absolute"
        assert b["dose"]["gamma_primary"]["pass_rate_percent"] == 100.0
        assert abs(b["dose"]["mean_dose_difference_percent"]) < 0.5
        assert b["delivery"]["verdict"] == "PASS" and b["delivery"]["flagged_layers"] == []
        assert all(layer["position_max_mm"] < 0.2 for layer in b["delivery"]["layers"])


def test_3mm_spot_shift_in_one_layer_fails_the_delivery_and_names_the_layer(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    perturb_logs(case, 2, layer=2, dx_mm=3.0)
    result = assess(case, delivered_doses(case, tmp_path / "out", shift_layer=(1, 3.0, 0.0)), config)
    f1 = beam(result, "F1")
    assert f1["delivery"]["verdict"] == "FAIL"
    assert f1["delivery"]["flagged_layers"] == [2]
    layer = f1["delivery"]["layers"][1]
    assert layer["position_mean_x_mm"] == pytest.approx(3.0, abs=0.1)
    assert layer["position_mean_mm"] == pytest.approx(3.0, abs=0.1)  # the worse axis
    assert abs(layer["position_mean_y_mm"]) < 0.1
    assert any("layer 2" in reason and "position mean x +3.0" in reason for reason in f1["delivery"]["reasons"])
    assert beam(result, "F2")["verdict"] == "PASS"
    assert f1["verdict"] == "FAIL" and result["verdict"] == "FAIL"


def test_5_percent_mu_error_fails_both_lines(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    perturb_logs(case, 3, mu_scale=1.05)
    result = assess(case, delivered_doses(case, tmp_path / "out", mu_scale=1.05), config)
    f2 = beam(result, "F2")
    assert f2["delivery"]["verdict"] == "FAIL" and f2["delivery"]["flagged_layers"] == [1, 2, 3]
    assert all(layer["layer_mu_diff_percent"] == pytest.approx(5.0, abs=0.2) for layer in f2["delivery"]["layers"])
    # Gamma at 3 %/2 mm can miss a uniform 5 % error; the mean dose difference does not.
    assert f2["dose"]["verdict"] == "FAIL"
    assert f2["dose"]["mean_dose_difference_percent"] == pytest.approx(5.0, abs=0.5)
    assert any("mean dose difference" in reason for reason in f2["dose"]["reasons"])
    assert result["verdict"] == "FAIL"


def test_5_percent_mu_error_in_a_relative_comparison_is_marked_and_caught_by_the_delivery_line(
    tmp_path: Path, config: dict
) -> None:
    case = make_case(tmp_path)
    perturb_logs(case, 3, mu_scale=1.05)
    result = assess(case, delivered_doses(case, tmp_path / "out", calibrated=False, mu_scale=1.05), config)
    f2 = beam(result, "F2")
    assert f2["dose"]["comparison"] == "relative"
    assert any("RELATIVE comparison" in note for note in f2["dose"]["notes"])
    # A relative comparison cannot see it, and so can never PASS ...
    assert f2["dose"]["verdict"] == "NOT ASSESSED"
    assert f2["dose"]["reasons"][0].startswith("dose scale not verified: our dose is RELATIVE")
    assert f2["verdict"] == "FAIL"  # ... the delivery check does see it


def test_swapped_beams_fail(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    result = assess(case, delivered_doses(case, tmp_path / "out", swap=True), config)
    for name in ("F1", "F2"):
        assert beam(result, name)["dose"]["verdict"] == "FAIL"
        assert beam(result, name)["dose"]["gamma_primary"]["pass_rate_percent"] < 90
    assert result["verdict"] == "FAIL"


def test_volume_export_and_effective_dose_are_read_at_the_configured_depth(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path, volume=True, dose_type="EFFECTIVE")
    rtdoses = delivered_doses(case, tmp_path / "out", mu_scale=1 / 1.1)
    result = assess(case, rtdoses, config)
    assert result["verdict"] == "PASS"
    assert any("EFFECTIVE" in note for note in beam(result, "F1")["dose"]["notes"])
    # The generator's volume rises 1 %/mm with depth around the isocentre. A TPS plane taken at
    # another depth than our 2 cm plane is not compared: 0.4 mm off is within the 0.5 mm
    # tolerance (interpolated between rows, TPS 0.4 % higher), 1 mm off is an ERROR naming both.
    deeper = copy.deepcopy(config)
    deeper["qa"]["plane_depth_mm"] = 20.4
    b = beam(assess(case, rtdoses, deeper), "F1")
    assert b["dose"]["verdict"] == "PASS"
    assert b["dose"]["mean_dose_difference_percent"] == pytest.approx(-100 * 0.004 / 1.004, abs=0.3)
    deeper["qa"]["plane_depth_mm"] = 21.0
    b = beam(assess(case, rtdoses, deeper), "F1")
    assert b["dose"]["verdict"] == "ERROR"
    assert "the TPS plane lies at y = 31 mm but ours at y = 30 mm" in b["dose"]["reasons"][0]
    deeper["qa"]["plane_depth_mm"] = 40.0
    b = beam(assess(case, rtdoses, deeper), "F1")
    assert b["dose"]["verdict"] == "ERROR" and "outside the dose grid" in b["dose"]["reasons"][0]


def test_relative_tps_dose_is_compared_relatively_and_never_passes(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path, units="RELATIVE")
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    assert result["verdict"] == "NOT ASSESSED"
    for b in result["beams"]:
        assert b["dose"]["comparison"] == "relative"
        assert b["dose"]["reasons"][0] == "dose scale not verified: the TPS dose is RELATIVE (export it in Gy)"
        assert b["dose"]["gamma_primary"]["pass_rate_percent"] == 100.0  # the shape agrees


def test_missing_tps_dose_is_not_assessed(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path, tps=False)
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    assert result["verdict"] == "NOT ASSESSED"
    assert "no TPS RT Dose" in beam(result, "F1")["dose"]["reasons"][0]


def test_tps_dose_of_a_wrong_beam_number_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    _, plan = plan_of(case)
    (case / "RD_TPS_3.dcm").unlink()
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, 3), "G2", x_rel, z_rel)
    qa_gen.write_tps_dose(case / "RD_TPS_7.dcm", plan, plane, x_abs, z_abs, beam_number=7)
    result = assess(case, delivered_doses(case, tmp_path / "out"), config)
    assert beam(result, "F1")["verdict"] == "PASS"
    f2 = beam(result, "F2")
    assert f2["verdict"] == "ERROR"
    assert "no TPS RT Dose for beam 3" in f2["dose"]["reasons"][0] and "beams [7]" in f2["dose"]["reasons"][0]
    assert result["verdict"] == "ERROR"


def test_missing_delivered_dose_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    rtdoses = delivered_doses(case, tmp_path / "out")[:1]
    f2 = beam(assess(case, rtdoses, config), "F2")
    assert f2["verdict"] == "ERROR" and "no delivered RT Dose references beam 3" in f2["dose"]["reasons"][0]


def _candidates(case: Path) -> list:
    return find_tps_doses(case)


def test_matching_errors_give_their_reason(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    _, plan = plan_of(case)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan)
    plane = qa_gen.tps_plane(qa_gen.plan_spots(plan, 2), "G2", x_rel, z_rel)
    with pytest.raises(TpsDoseProblem, match=r"no TPS RT Dose references plan 1\.2\.3") as info:
        match(_candidates(case), "1.2.3", 2, 2)
    assert info.value.kind == "ERROR"
    qa_gen.write_tps_dose(case / "RD_TPS_2b.dcm", plan, plane, x_abs, z_abs, beam_number=2)
    with pytest.raises(TpsDoseProblem, match="2 TPS RT Doses for beam 2"):
        match(_candidates(case), plan.SOPInstanceUID, 2, 2)
    # A PLAN dose stands in for the beam only when the plan has one treatment beam.
    other = tmp_path / "plan_dose"
    qa_gen.write_tps_dose(other / "RD_PLAN.dcm", plan, plane, x_abs, z_abs, beam_number=None)
    assert match(find_tps_doses(other), plan.SOPInstanceUID, 2, 1).name == "RD_PLAN.dcm"
    with pytest.raises(TpsDoseProblem, match="no TPS RT Dose for beam 2"):
        match(find_tps_doses(other), plan.SOPInstanceUID, 2, 2)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("DoseUnits", "CGY", "DoseUnits 'CGY'"),
        ("DoseType", "ERROR", "DoseType 'ERROR'"),
        ("DoseSummationType", "FRACTION", "DoseSummationType 'FRACTION'"),
    ],
)
def test_header_errors_give_their_reason(tmp_path: Path, keyword: str, value: str, reason: str) -> None:
    ds = pydicom.Dataset()
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "BEAM"
    setattr(ds, keyword, value)
    with pytest.raises(TpsDoseProblem, match=reason):
        check_header(ds, tmp_path / "RD.dcm", 1.1, "plan", 1)


def test_fraction_scaling(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "BEAM"
    assert check_header(ds, tmp_path / "RD.dcm", 1.1, "plan", 30)[0] == pytest.approx(1 / 30)
    assert check_header(ds, tmp_path / "RD.dcm", 1.1, "fraction", 30)[0] == 1.0
    ds.DoseSummationType = "BEAM_SESSION"  # one session: one fraction, whatever the setting says
    assert check_header(ds, tmp_path / "RD.dcm", 1.1, "plan", 30)[0] == 1.0
    ds.DoseSummationType = "BEAM"
    with pytest.raises(TpsDoseProblem, match="no NumberOfFractionsPlanned"):
        check_header(ds, tmp_path / "RD.dcm", 1.1, "plan", None)


def test_empty_tps_plane_is_an_error(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path, tps=False)
    _, plan = plan_of(case)
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan)
    path = qa_gen.write_tps_dose(
        case / "RD_TPS_2.dcm", plan, np.zeros((z_rel.size, x_rel.size)), x_abs, z_abs, beam_number=2
    )
    with pytest.raises(TpsDoseProblem, match="empty"):
        load_tps_plane(path, 30.0, config["qa"], 1, plan.FrameOfReferenceUID)


def test_cli_writes_qa_json_and_a_self_contained_sheet(tmp_path: Path, config: dict) -> None:
    case = make_case(tmp_path)
    rtdoses = delivered_doses(case, tmp_path / "out")
    manifest = tmp_path / "intake.json"
    manifest.write_text(json.dumps(build_manifest(case, config)))
    before = {p: p.stat().st_mtime_ns for p in case.rglob("*") if p.is_file()}
    out = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.qa.run", "--manifest", str(manifest), "--rtdoses", *map(str, rtdoses),
         "--settings", str(REPO / "config" / "config.yaml"), "--json", str(tmp_path / "qa.json"),
         "--calibration", json.dumps(current_calibration()),
         "--sheet", str(tmp_path / "qa.html"), "--figures", str(tmp_path / "fig")],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "PASS" in out.stdout
    qa = json.loads((tmp_path / "qa.json").read_text())
    assert qa["verdict"] == "PASS" and len(qa["provenance"]["inputs"]) > 3
    html = (tmp_path / "qa.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src='http" not in html and "Provenance" in html
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["qa_F1.png", "qa_F2.png"]
    assert before == {p: p.stat().st_mtime_ns for p in case.rglob("*") if p.is_file()}  # input untouched


def test_compare_refuses_planes_along_different_axes_or_beyond_the_delivered_grid(config: dict) -> None:
    from mqi_communicator.qa.tps_dose import Plane
    from mqi_communicator.qa.verdict import compare

    axis = np.arange(-20.0, 21.0)
    dose = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / 200.0)
    tps = Plane(dose, axis, axis, "xz", "GY")
    sagittal = Plane(dose, axis, axis, "yz", "GY")
    result = compare(tps, sagittal, config["qa"], {"state": "current"})
    assert result["verdict"] == "ERROR" and "along patient xz but the delivered plane along yz" in result["reasons"][0]
    small = Plane(dose[10:-10, 10:-10], axis[10:-10], axis[10:-10], "xz", "GY")
    result = compare(tps, small, config["qa"], {"state": "current"})
    assert result["verdict"] == "ERROR" and "outside the delivered dose grid" in result["reasons"][0]

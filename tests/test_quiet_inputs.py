"""Cases that look fine but are not (issue 10, findings 1, 2, 3 and 5): each is first shown to be
wrong in the way that used to pass quietly, then refused (or flagged) with the file and the
problem named, while the good case beside it is processed unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.cli import read_marker
from mqi_communicator.errors import CaseError
from mqi_communicator.formats import moqui_csv, ptn
from mqi_communicator.formats.plan import read_plan
from mqi_communicator.intake.case import build_manifest, case_readiness
from mqi_communicator.interpret import interpret_case
from mqi_communicator.simulate import engine
from tests import casegen


def _truncated_copy(case: Path, fraction: float) -> Path:
    plan = next(case.glob("RP*.dcm"))
    plan.write_bytes(plan.read_bytes()[: int(plan.stat().st_size * fraction)])
    return plan


# --- finding 1: a truncated plan ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "declaration"),
    [
        # Cut inside IonBeamSequence: its declared length runs past the end of the file.
        (0.3, "cannot read DICOM (cut short or damaged?): its last element ((300A,03A2)) needs"),
        # Cut inside the last beam's control points: refused as it is read (plan.read_plan decodes
        # every sequence) or by the self-check, depending on where the element boundary falls.
        (0.6, ("cannot read DICOM (cut short or damaged?)", "the plan contradicts its own declarations")),
    ],
)
@pytest.mark.parametrize("mode", ["plan", "logs"])
def test_truncated_plan_is_refused_naming_the_plan(
    tmp_path: Path, config: dict, fraction: float, declaration: str | tuple[str, ...], mode: str
) -> None:
    good = casegen.write_case(tmp_path, "good", deliveries=mode == "logs")
    cut = casegen.write_case(tmp_path, "cut", deliveries=mode == "logs")
    plan = _truncated_copy(cut, fraction)
    # The wrong result: the cut file still parses, with beams or control points missing.
    ds = pydicom.dcmread(plan)
    complete = pydicom.dcmread(next(good.glob("RP*.dcm")))
    assert len(ds.IonBeamSequence) < len(complete.IonBeamSequence) or len(
        ds.IonBeamSequence[-1].IonControlPointSequence
    ) < int(ds.IonBeamSequence[-1].NumberOfControlPoints)

    with pytest.raises(CaseError) as info:
        build_manifest(cut, config)
    message = str(info.value)
    expected = (declaration,) if isinstance(declaration, str) else declaration
    assert any(message.startswith(f"{plan}: {text}") for text in expected), message
    assert "PlanInfo.txt" not in message  # the plan is to blame, not the delivery
    # The good case beside it.
    manifest = build_manifest(good, config)
    assert [b["number"] for b in manifest["beams"]] == [2, 3]
    assert manifest["mode"] == mode


def test_cumulative_meterset_and_spot_counts_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "RP.dcm"
    casegen.write_plan(path, casegen.standard_case())
    assert read_plan(path).warnings == []
    ds = pydicom.dcmread(path)
    ds.IonBeamSequence[1].FinalCumulativeMetersetWeight = 2.0
    ds.IonBeamSequence[1].IonControlPointSequence[2].NumberOfScanSpotPositions = 7
    ds.save_as(path)
    with pytest.raises(CaseError) as info:
        read_plan(path)
    assert "not at FinalCumulativeMetersetWeight 2" in str(info.value)
    assert (
        "control point 2: NumberOfScanSpotPositions is 7 but it holds standard arrays of 32 coordinates and 16 weights"
        in str(info.value)
    )


def test_reference_plan_passes_with_its_odd_fraction_group_said(reference_data: Path) -> None:
    plan = read_plan(reference_data / "RP_G2_9spots_phantom.dcm")
    assert len(plan.treatment_beams) == 5
    assert any("[6, 7, 8, 9]" in w for w in plan.warnings)


# --- finding 2: completeness against the plan --------------------------------------------------


def test_missing_delivery_waits_then_fails_naming_the_beam(tmp_path: Path, config: dict) -> None:
    good = casegen.write_case(tmp_path, "good")
    late = casegen.write_case(tmp_path, "late")
    shutil.rmtree(sorted(p for p in late.iterdir() if p.is_dir())[1])  # beam 3's delivery not here yet
    marker_time = (late / "_CASE_READY").stat().st_mtime
    wait = config["application"]["delivery_wait_seconds"]

    state, reason = case_readiness(late, config, now=marker_time + 60)
    assert state == "waiting"
    assert "waiting for deliveries of beam 3 ('2G90'): no delivery" in reason
    state, reason = case_readiness(late, config, now=marker_time + wait + 1)
    assert state == "failed"
    assert reason.startswith("incomplete: beam 3 ('2G90'): no delivery")
    with pytest.raises(CaseError, match=r"incomplete: beam 3 \('2G90'\): no delivery"):
        build_manifest(late, config, now=marker_time + wait + 1)
    assert case_readiness(good, config) == ("ready", "every treatment beam delivered")
    assert [b["simulate"] for b in build_manifest(good, config)["beams"]] == [True, True]


def test_partial_delivery_waits_for_its_last_layers(tmp_path: Path, config: dict) -> None:
    spec = casegen.standard_case()
    case = casegen.write_case(tmp_path, "c1", spec)
    casegen.write_delivery(case, spec, 2, "2026110310000000", stop_layer=2)  # a new fraction, cut short
    state, reason = case_readiness(case, config)
    assert state == "waiting" and "beam 2 ('1G180:TX'): layers 3-4 of 4 not delivered" in reason
    casegen.write_delivery(case, spec, 2, "2026110310200000", start_layer=3)  # the rest arrives
    assert case_readiness(case, config)[0] == "ready"


def test_no_logs_is_plan_mode_only_when_declared(tmp_path: Path, config: dict) -> None:
    undeclared = casegen.write_case(tmp_path, "undeclared", deliveries=False, plan_mode=False)
    state, reason = case_readiness(undeclared, config)
    assert state == "waiting"
    assert "beam 2 ('1G180:TX'): no delivery; beam 3 ('2G90'): no delivery" in reason
    declared = casegen.write_case(tmp_path, "declared", deliveries=False)
    assert (declared / "_PLAN_MODE").is_file()
    assert case_readiness(declared, config)[0] == "ready"
    manifest = build_manifest(declared, config)
    assert manifest["mode"] == "plan" and manifest["labels"] == ["PLAN-BASED"]
    config["interpreter"]["source"] = "plan"  # configured: no declaration needed
    assert build_manifest(undeclared, config)["labels"] == ["PLAN-BASED"]


def test_waiting_time_counts_from_the_ready_marker(tmp_path: Path, config: dict) -> None:
    late = casegen.write_case(tmp_path, "late")
    shutil.rmtree(sorted(p for p in late.iterdir() if p.is_dir())[0])
    config["application"]["delivery_wait_seconds"] = 600
    old = time.time() - 3600
    os.utime(late / "_CASE_READY", (old, old))
    assert case_readiness(late, config)[0] == "failed"
    (late / "_CASE_READY").touch()  # marked ready again just now
    assert case_readiness(late, config)[0] == "waiting"


# --- finding 3: implausible PTN layers -----------------------------------------------------------


def _break_layer(case: Path, how: str) -> Path:
    folder = sorted(p for p in case.iterdir() if p.is_dir())[0]
    path = sorted(folder.glob("*.ptn"))[1]  # layer 2 of beam 2
    log = ptn.read_ptn(path).astype(np.int64)
    cal = casegen.ROOMS["G2"]
    if how == "empty":
        path.write_bytes(b"")
    elif how == "all_ffff":
        path.write_bytes(b"\xff" * len(log) * 16)
    elif how == "shifted_20mm":
        on = (log[:, 7] & ptn.FLAG_ACTUAL_BEAM_ON) != 0
        log[on, 0] += round(20.0 / cal.x_gain_mm)  # every spot 20 mm off in x
        ptn.write_ptn(path, log)
    elif how == "half_mu":
        log[:, 4] //= 2
        ptn.write_ptn(path, log)
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("empty", "the log is empty (0 samples)"),
        ("all_ffff", "every one of its"),
        ("shifted_20mm", "from every planned spot"),
        ("half_mu", "MU planned (-50."),
    ],
)
def test_implausible_layer_fails_or_is_flagged(tmp_path: Path, config: dict, how: str, message: str) -> None:
    good = casegen.write_case(tmp_path, "good")
    bad = casegen.write_case(tmp_path, "bad")
    path = _break_layer(bad, how)
    if how == "all_ffff":
        # The wrong result: every sample maps to the far edge of the field, beam on.
        cal = casegen.ROOMS["G2"]
        assert abs(cal.x_mm(np.array([0xFFFF]))[0]) == pytest.approx(297.3, abs=0.1)
    with pytest.raises(CaseError) as info:
        build_manifest(bad, config)
    text = str(info.value)
    assert f"{path}: layer 2 (145 MeV) of beam 2 ('1G180:TX'): " in text and message in text

    config["log_checks"]["on_failure"] = "flag"
    manifest = build_manifest(bad, config)
    assert manifest["labels"] == ["FLAGGED"]
    assert len(manifest["flags"]) >= 1 and all(str(path) in f for f in manifest["flags"])
    assert any(w.startswith("FLAGGED") for w in manifest["warnings"])
    good_manifest = build_manifest(good, config)
    assert good_manifest["labels"] == [] and good_manifest["flags"] == []


def test_layer_checks_accept_the_generated_logs() -> None:
    """Line-scanning logs with jitter, beam-off parking and counts noise pass every check."""
    spec = casegen.standard_case()
    layer_spots = spec.beams[1].spots_xy_mm[0]
    rng = np.random.default_rng(3)
    cal = casegen.ROOMS["G2"]
    energy = spec.beams[1].energies_mev[0]
    log = casegen.layer_log(layer_spots, 0.02, cal, 2, 40, 200, rng, energy_mev=energy)
    checks = {"scan_field_half_mm": 200, "spot_distance_mm": 10, "max_off_spot_fraction": 0.05, "mu_tolerance": 0.25}
    planned_mu = 0.02 * len(layer_spots)
    assert ptn.layer_problems(log, cal, 1.0, planned_mu, layer_spots, checks, energy_mev=energy) == []
    outside = log.astype(np.int64)
    outside[-50:, 0] = 65000
    outside[-50:, 7] = ptn.FLAG_ACTUAL_BEAM_ON
    outside[-50:, 4] = 10
    problems = ptn.layer_problems(
        outside.astype(np.uint16), cal, 1.0, planned_mu, layer_spots, checks, energy_mev=energy
    )
    assert any("50 beam-on samples lie outside the scanning field" in p for p in problems)


# --- finding 5: layers by the number in the PTN name --------------------------------------------


def _many_layer_case(root: Path, layers: int) -> tuple[Path, casegen.CaseSpec]:
    """One beam of `layers` layers, layer k a single spot at x = k - 60 mm, so a log paired with
    another layer's plan entry is visible in the CSV."""
    spots = [[(float(k - 60), 0.0)] for k in range(1, layers + 1)]
    spec = casegen.CaseSpec(
        patient_id="MANY", beams=[casegen.BeamSpec(1, "B1", [230.0 - k for k in range(layers)], spots)]
    )
    case = casegen.write_case(root, "many", spec, samples_per_spot=4, off_samples=2, range_codes=[5] * layers)
    return case, spec


def test_unpadded_layer_numbers_past_99_layers(tmp_path: Path, config: dict) -> None:
    case, _ = _many_layer_case(tmp_path, 120)
    folder = next(p for p in case.iterdir() if p.is_dir())
    for path in folder.glob("*.ptn"):  # `_001` ... `_120` -> `_1` ... `_120`
        stem, number = path.stem.rsplit("_", 1)
        path.rename(path.with_name(f"{stem}_{int(number)}.ptn"))
    names = sorted(p.name for p in folder.glob("*.ptn"))
    # The wrong result of pairing by sorted name: 119 of 120 files are not their position's layer.
    wrong = sum(int(name.rsplit("_", 1)[1].removesuffix(".ptn")) != k for k, name in enumerate(names, start=1))
    assert wrong == 119

    manifest = build_manifest(case, config)
    entries = manifest["deliveries"][0]["ptn"]
    assert [e["layer"] for e in entries] == list(range(1, 121))
    assert all(e["file"].endswith(f"_{e['layer']}.ptn") for e in entries)
    out = tmp_path / "p2"
    interpret_case(manifest, config, out)
    files = sorted((out / "log" / "B1").glob("*.csv"))
    # Three-digit layer numbers, so the names sort in layer order; the energy part is unchanged.
    assert files[0].name == "001_230.00MeV.csv" and files[99].name == "100_131.00MeV.csv"
    for k, path in enumerate(files, start=1):
        samples = moqui_csv.read_layer(path)
        beam_on_x = samples[samples[:, 3] > 100, 1]
        assert np.allclose(beam_on_x, k - 60, atol=0.2), path.name  # layer k's log, nobody else's
    # The engine (which reads the energy after the first `_`) gets the layers in order.
    energies = [layer.energy_mev for layer in engine._read_layers(out / "log" / "B1")]
    assert energies == [230.0 - k for k in range(120)]


def test_layer_numbers_checked_against_planrange(tmp_path: Path, config: dict) -> None:
    case, _ = _many_layer_case(tmp_path, 4)
    folder = next(p for p in case.iterdir() if p.is_dir())
    out = tmp_path / "p2"
    interpret_case(build_manifest(case, config), config, out)
    assert sorted(p.name for p in (out / "log" / "B1").iterdir())[0] == "01_230.00MeV.csv"  # 2 digits as before
    planrange = folder / "PlanRange.txt"
    planrange.write_text(planrange.read_text().replace("3,228.00,", "3,180.00,"))
    with pytest.raises(CaseError, match=r"PlanRange\.txt: line 4: layer 3 energy 180 MeV, the plan has 228 MeV"):
        build_manifest(case, config)
    planrange.write_text(planrange.read_text().replace("3,180.00,", "3,228.00,"))
    ptn_file = next(folder.glob("*_004.ptn"))
    ptn_file.rename(ptn_file.with_name(ptn_file.name.replace("_004", "_007")))
    with pytest.raises(CaseError, match=r"PTN layer numbers \[1, 2, 3, 7\] are not the delivered layers 1..4"):
        build_manifest(case, config)


def test_intake_cli_does_not_remember_a_waiting_case_as_failed(tmp_path: Path) -> None:
    late = casegen.write_case(tmp_path / "scan", "late")
    delivery = sorted(p for p in late.iterdir() if p.is_dir())[1]
    parked = shutil.move(delivery, tmp_path / "parked")
    command = [sys.executable, "-m", "mqi_communicator.intake", "--case", str(late), "--output"]
    command += [str(tmp_path / "out" / "intake.json")]
    waiting = subprocess.run(command, capture_output=True, text=True, check=False)
    # Said as waiting, and marked so for the run recorder (the case is tried again, not failed).
    assert waiting.returncode == 1 and "INTAKE WAITING for case late" in waiting.stderr
    marker = read_marker(waiting.stderr)
    assert marker is not None and (marker["kind"], marker["step"], marker["error"]) == (
        "waiting",
        "intake",
        "CaseWaiting",
    )
    assert "waiting for deliveries" in marker["message"], marker
    shutil.move(parked, delivery)  # the logs arrive
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

"""Beam modifiers are modelled or refused, never ignored (docs/beam-modifiers.md).

The range shifter is checked against the physics, not against the engine's own code: its
depth dose must come back by the WET (R80 within 1 mm), and its spot at the 2 cm plane must
widen by the Highland angle of a 30 mm water slab (closed form, mid-slab energy) times the
drift. Plans are the engine tests' and casegen's, reshaped with pydicom (plan_shapes_modifiers)
to carry the modifiers PS3.3 C.8.8.25/26 describes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.formats.plan import find_plan
from mqi_communicator.formats.raw_dose import PHANTOM_3D, PLANE_2CM, read_raw
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.simulate import engine
from tests import casegen
from tests.plan_shapes_modifiers import (
    add_block,
    add_lateral_spreading_device,
    add_range_shifter,
    change_range_shifter_at,
)
from tests.test_engine import beam_case, gaussian_fit, only_raw

ENERGY_MEV = 150.0
WET_MM = 30.0
DISTANCE_MM = 300.0  # isocentre to the shifter's downstream face


def _dose(tmp_path: Path, shifter: dict | None, three_d: bool, capsys: pytest.CaptureFixture[str]) -> np.ndarray:
    params = beam_case(tmp_path, "RS", [(0.0, 0.0)], energy=ENERGY_MEV)
    if shifter is not None:
        add_range_shifter(tmp_path / "plan" / "RP.dcm", 1, **shifter)
    if three_d:
        params.write_text(params.read_text().replace("TwoCentimeterMode true", "TwoCentimeterMode false"))
    assert engine.main([str(params)]) == 0, capsys.readouterr().out
    return read_raw(str(only_raw(tmp_path / "out")), PHANTOM_3D if three_d else PLANE_2CM)


def _r80_mm(curve: np.ndarray, depth: np.ndarray) -> float:
    """Distal depth where the laterally integrated dose falls to 80 % of its maximum."""
    peak = int(curve.argmax())
    tail = curve[peak:] / curve.max()
    k = int(np.flatnonzero(tail < 0.8)[0])
    z0, z1, d0, d1 = depth[peak + k - 1], depth[peak + k], tail[k - 1], tail[k]
    return float(z0 + (0.8 - d0) * (z1 - z0) / (d1 - d0))


def test_range_shifter_pulls_the_range_back_by_its_wet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    depth = PHANTOM_3D.centres("z")
    bare = _dose(tmp_path / "bare", None, True, capsys).sum(axis=(1, 2))
    shifted = _dose(tmp_path / "rs", {"wet_mm": WET_MM}, True, capsys).sum(axis=(1, 2))
    r80_bare, r80_shifted = _r80_mm(bare, depth), _r80_mm(shifted, depth)
    # The bare beam's R80 is its Bragg-Kleeman range (within a voxel); the shifter takes 30 mm off.
    assert abs(r80_bare - 10 * 0.0022 * ENERGY_MEV**1.77) < 2.0
    assert abs((r80_bare - r80_shifted) - WET_MM) < 1.0
    # The phantom receives the energy the shifter leaves: E'/E of it, less the protons lost to
    # nuclear interactions in 3 cm of water (about 1.2 %/cm).
    e_after = ((0.0022 * ENERGY_MEV**1.77 - WET_MM / 10) / 0.0022) ** (1 / 1.77)
    assert shifted.sum() / bare.sum() == pytest.approx(e_after / ENERGY_MEV * (1 - 0.012 * WET_MM / 10), rel=0.02)


def test_range_shifter_widens_the_spot_by_the_highland_angle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, sigma_bare = gaussian_fit(_dose(tmp_path / "bare", None, False, capsys)[0], (0.0, 0.0), 30.0)
    plane = _dose(tmp_path / "rs", {"wet_mm": WET_MM, "isocenter_distance_mm": DISTANCE_MM}, False, capsys)[0]
    _, _, sigma_shifted = gaussian_fit(plane, (0.0, 0.0), 30.0)

    # Analytic expectation, written out here: Highland (13.6 MeV / pv) sqrt(L / X0) for the
    # slab at its mid-thickness energy, times the drift from its downstream face to the 2 cm
    # plane (= the isocentre); the water's own scattering over 2 cm uses the energy left.
    def energy_after(mm: float) -> float:
        return ((0.0022 * ENERGY_MEV**1.77 - mm / 10) / 0.0022) ** (1 / 1.77)

    e_mid = energy_after(WET_MM / 2)
    pv = (e_mid**2 + 2 * e_mid * 938.272) / (e_mid + 938.272)
    theta = 13.6 / pv * math.sqrt(WET_MM / 10 / 36.08)
    water_bare = float(engine.mcs_sigma_mm(ENERGY_MEV, np.array([20.0]))[0])
    water_after = float(engine.mcs_sigma_mm(energy_after(WET_MM), np.array([20.0]))[0])
    expected = math.sqrt(sigma_bare**2 - water_bare**2 + water_after**2 + (theta * DISTANCE_MM) ** 2)
    assert sigma_shifted > sigma_bare * 1.2
    assert sigma_shifted == pytest.approx(expected, rel=0.02)
    # The same shifter right at the phantom (20 mm before the isocentre) barely widens it.
    near = _dose(tmp_path / "near", {"wet_mm": WET_MM, "isocenter_distance_mm": 20.0}, False, capsys)[0]
    assert gaussian_fit(near, (0.0, 0.0), 30.0)[2] < sigma_bare * 1.05


def test_shifter_out_of_the_beam_changes_nothing_but_the_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = _dose(tmp_path / "bare", None, False, capsys)
    out = _dose(tmp_path / "out", {"setting": "OUT"}, False, capsys)
    assert "setting OUT, not in the beam" in capsys.readouterr().out
    assert only_raw(tmp_path / "out" / "out").name == "RS_3_Dose.raw"
    assert np.array_equal(bare, out)


@pytest.mark.parametrize(
    ("shape", "named"),
    [
        (lambda p: add_range_shifter(p, 1, wet_mm=None), "no RangeShifterWaterEquivalentThickness (300A,0366)"),
        (lambda p: add_range_shifter(p, 1, isocenter_distance_mm=None), "no IsocenterToRangeShifterDistance"),
        (lambda p: add_block(p, 1, "APERTURE1"), "1 block(s) (NumberOfBlocks 1; 'APERTURE1')"),
        (lambda p: add_lateral_spreading_device(p, 1, "SCATTERER", "SS1"), "lateral spreading device 'SS1'"),
    ],
)
def test_engine_refuses_what_it_cannot_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: Callable[[Path], None], named: str
) -> None:
    params = beam_case(tmp_path, "MOD", [(0.0, 0.0)])
    shape(tmp_path / "plan" / "RP.dcm")
    assert engine.main([str(params)]) == 1
    out = capsys.readouterr().out
    assert "ERROR:" in out and named in out and "beam 1 'MOD'" in out
    assert not list(tmp_path.glob("out/*.raw"))


def test_intake_labels_a_modelled_range_shifter(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "rs")
    add_range_shifter(find_plan(case), 2, shifter_id="RS30", wet_mm=30.0)
    manifest = build_manifest(case, config)
    assert "RANGE SHIFTER RS30 30 mm modelled" in manifest["labels"]
    beam2 = next(b for b in manifest["beams"] if b["number"] == 2)
    assert beam2["range_shifters"][0] == {
        "number": 1,
        "shifter_id": "RS30",
        "accessory_code": "AC-RS30",
        "shifter_type": "BINARY",
        "setting": "IN",
        "isocenter_distance_mm": 300.0,
        "wet_mm": 30.0,
    }
    # Real MOQUI reads the shifter from the plan itself: no WET is no refusal, but still a label.
    add_range_shifter(find_plan(case), 3, shifter_id="RS40", wet_mm=None, number=1)
    with pytest.raises(CaseError, match="range shifter RS40 has no RangeShifterWaterEquivalentThickness"):
        build_manifest(case, config)
    moqui = config | {"executables": config["executables"] | {"moqui": "/opt/moqui/tps_env"}}
    assert build_manifest(case, moqui)["labels"] == [
        "RANGE SHIFTER RS30 30 mm modelled by MOQUI",
        "RANGE SHIFTER RS40 modelled by MOQUI",
    ]


@pytest.mark.parametrize("engine_path", ["builtin", "/opt/moqui/tps_env"])
def test_intake_fails_a_case_with_a_block_naming_it(tmp_path: Path, config: dict, engine_path: str) -> None:
    case = casegen.write_case(tmp_path, "blk")
    plan_path = find_plan(case)
    add_block(plan_path, 3, "APERTURE1")
    chosen = config | {"executables": config["executables"] | {"moqui": engine_path}}
    with pytest.raises(CaseError) as failure:
        build_manifest(case, chosen)
    message = str(failure.value)
    assert str(plan_path) in message and "beam 3" in message and "1 block(s)" in message and "'APERTURE1'" in message


def test_scanning_magnets_are_not_modifiers_but_a_changing_shifter_is_refused(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "lsd")
    add_lateral_spreading_device(find_plan(case), 2, "MAGNET", "X MAGNET")
    assert build_manifest(case, config)["labels"] == []
    add_range_shifter(find_plan(case), 2, wet_mm=30.0)
    change_range_shifter_at(find_plan(case), 2, 2, wet_mm=45.0)
    with pytest.raises(CaseError, match="range shifter 1 settings change at control point 2"):
        build_manifest(case, config)

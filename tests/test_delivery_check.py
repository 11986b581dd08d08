"""The delivery check (qa/delivery.py) on real and generated logs, and the log<->plan frame
(docs/log-plan-frame.md) pinned on the clinic's real plan and log-derived file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mqi_communicator.formats import moqui_csv, ptn
from mqi_communicator.formats.log_csv import LogCsvEncoder
from mqi_communicator.formats.plan import Beam, Layer, read_plan
from mqi_communicator.qa import delivery, spot_match
from tests import casegen

CAL = casegen.ROOMS["G2"]
ENERGY = 150.0
RANGE_CODE = 2  # monitor range factor 1.0


@pytest.fixture
def tol(config: dict) -> dict:
    return dict(config["qa"]["delivery"])


def _layer(spots: list[tuple[float, float]], mu: float | list[float]) -> Layer:
    mus = [mu] * len(spots) if isinstance(mu, float) else list(mu)
    return Layer(energy_mev=ENERGY, mu=sum(mus), spot_xy_mm=list(spots), spot_mu=mus)


def _log(spots: list[tuple[float, float]], mu: float | list[float], seed: int = 0, repaint: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return casegen.layer_log(spots, mu, CAL, RANGE_CODE, 60, 20, rng, energy_mev=ENERGY, repaint=repaint)


def _check(layer: Layer, rows: np.ndarray, tol: dict, cal: ptn.RoomCalibration = CAL, mode: str = "MODULATED") -> dict:
    return delivery.check_layer(layer, rows.astype(np.uint16), cal, cal.mu_per_count(layer.energy_mev), tol, mode)


GRID = casegen.grid_spots(20.0, 10.0)  # 5 x 5 serpentine, 10 mm apart


# --- the real reference pair ---------------------------------------------------------------------


def _reference_rows(reference_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The clinic's log-derived CSV of 2S110 layer 1 back to PTN rows (the machine's frame): the
    CSV holds (raw - offset) x gain unmirrored (its parked x, +294.7 mm, needs raw 65169, which
    a mirrored conversion could not reach) and count = dose1 x range factor; it has no beam-on
    flag, so samples with dose inside the scanning field (|x|, |y| <= 200 mm) are beam-on."""
    values = moqui_csv.read_layer(reference_data / "legacy_single_line_2S110_01_110MeV.csv")
    raw_x = values[:, 1] / CAL.x_gain_mm + CAL.x_offset
    raw_y = values[:, 2] / CAL.y_gain_mm + CAL.y_offset
    assert np.abs(raw_x - np.rint(raw_x)).max() < 0.05  # the G2 offset and gain reproduce the file
    rows = np.zeros((len(values), 8), dtype=np.int64)
    rows[:, 0], rows[:, 1], rows[:, 4] = np.rint(raw_x), np.rint(raw_y), values[:, 3]
    on = (values[:, 3] > 0) & (np.abs(values[:, 1]) <= 200) & (np.abs(values[:, 2]) <= 200)
    rows[on, 7] = ptn.FLAG_PLANNED_BEAM_ON | ptn.FLAG_ACTUAL_BEAM_ON | 1
    return rows, values


def test_real_plan_and_real_log_agree_in_the_settled_frame(reference_data: Path, config: dict, tol: dict) -> None:
    rows, _ = _reference_rows(reference_data)
    beam = read_plan(reference_data / "RP_G2_9spots_phantom.dcm").beam(2)
    assert beam is not None and beam.name == "2S110" and beam.scan_mode == "LINE"
    layer = beam.layers[0]
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    result = _check(layer, rows, tol, cal, beam.scan_mode)
    assert result["method"] == "spots"  # zero-length lines: the SHI way to plan spots
    assert result["flags"] == [] and result["notes"] == []
    assert result["pairing"]["order_as_planned"] is True  # delivered in plan order, x as planned
    assert result["pairing"]["spots_matched"] == 9 and result["pairing"]["visits_unmatched"] == 0
    assert result["position_max_mm"] < 0.05
    assert abs(result["layer_mu_diff_percent"]) < 1.0 and abs(result["spot_mu_max_diff_percent"]) < 1.0


def test_the_old_convention_mirrors_x_and_loses_28_percent_of_the_mu(
    reference_data: Path, config: dict, tol: dict
) -> None:
    rows, _ = _reference_rows(reference_data)
    layer = read_plan(reference_data / "RP_G2_9spots_phantom.dcm").beams[1].layers[0]
    settled = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    old = dataclasses.replace(settled, x_sign=1.0, mu_factor_energies_mev=(), mu_factor_values=())
    result = _check(layer, rows, tol, old, "LINE")
    # The symmetric grid still pairs by position, but the delivery order gives the mirror away.
    assert result["pairing"]["order_as_planned"] is False
    assert result["layer_mu_diff_percent"] == pytest.approx(-28.6, abs=0.3)
    assert any("layer MU off by -28.5" in flag for flag in result["flags"])


def test_p2_writes_the_real_log_in_the_plan_frame(reference_data: Path, config: dict) -> None:
    rows, legacy = _reference_rows(reference_data)
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    encoder = LogCsvEncoder(cal, config["monitor_range_factors"], 1.0, "rows")
    written = moqui_csv.parse_values(encoder.encode(rows.astype(np.uint16), RANGE_CODE).tobytes())
    assert written is not None
    values = written.reshape(-1, 4)
    np.testing.assert_allclose(values[:, 1], -legacy[:, 1], atol=1e-3)  # x mirrored into the plan frame
    np.testing.assert_allclose(values[:, 2], legacy[:, 2], atol=1e-3)
    np.testing.assert_array_equal(values[:, 3], legacy[:, 3])  # counts unchanged (MOQUI converts them)
    first = values[values[:, 3] > 1000][0]
    assert (round(first[1]), round(first[2])) == (-50, 50)  # the plan's first spot


def test_intake_log_check_accepts_the_real_layer(reference_data: Path, config: dict) -> None:
    rows, _ = _reference_rows(reference_data)
    layer = read_plan(reference_data / "RP_G2_9spots_phantom.dcm").beams[1].layers[0]
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    checks = dict(config["log_checks"], mu_tolerance=0.02)
    problems = ptn.layer_problems(
        rows.astype(np.uint16), cal, 1.0, layer.mu, layer.spot_xy_mm, checks, energy_mev=layer.energy_mev
    )
    assert problems == []


# --- matching, repainting, per-axis limits, MU floor ---------------------------------------------


def test_spots_delivered_in_swapped_order_pass(tol: dict) -> None:
    delivered = list(GRID)
    delivered[3], delivered[4] = delivered[4], delivered[3]
    result = _check(_layer(GRID, 0.05), _log(delivered, 0.05), tol)
    assert result["flags"] == []
    assert result["pairing"]["order_as_planned"] is False and result["pairing"]["spots_matched"] == len(GRID)
    assert "another order than planned" in result["notes"][0]
    assert result["position_max_mm"] < 0.1 and abs(result["spot_mu_max_diff_percent"]) < 0.5


def test_a_plan_with_different_spot_mu_is_paired_by_position_not_order(tol: dict) -> None:
    """Swapped delivery of two spots with different MU: paired by order their MU would be 2x off."""
    mus = [0.02 + 0.002 * k for k in range(len(GRID))]
    order = [1, 0, *range(2, len(GRID))]
    result = _check(_layer(GRID, mus), _log([GRID[k] for k in order], [mus[k] for k in order]), tol)
    assert result["flags"] == [] and abs(result["spot_mu_max_diff_percent"]) < 0.5


@pytest.mark.parametrize("flagged", [True, False], ids=["repaint-flags", "revisits"])
def test_repainted_layer_passes_with_mu_summed_over_paintings(tol: dict, flagged: bool) -> None:
    """Two paintings of 0.025 MU per spot for 0.05 MU planned: with the repaint index in the
    flags (bits 0-6), or as plain revisits of the same positions."""
    first = _log(GRID, 0.025, seed=1, repaint=1)
    second = _log(GRID[::-1], 0.025, seed=2, repaint=2 if flagged else 1)
    result = _check(_layer(GRID, 0.05), np.concatenate([first, second]), tol)
    assert result["flags"] == []
    assert result["pairing"]["visits_logged"] == 2 * len(GRID) and result["pairing"]["spots_matched"] == len(GRID)
    assert result["pairing"]["paintings"] == (2 if flagged else 1)
    assert abs(result["spot_mu_max_diff_percent"]) < 0.5
    assert result["layer_mu_logged"] == pytest.approx(0.05 * len(GRID), rel=1e-3)


@pytest.mark.parametrize(("offset", "passes"), [(0.8, True), (1.2, False)])
def test_per_axis_limits(tol: dict, offset: float, passes: bool) -> None:
    """0.8 mm in each axis is 1.13 mm radially: within 1 mm per axis; 1.2 mm per axis is not."""
    shifted = [(x + offset, y + offset) for x, y in GRID]
    result = _check(_layer(GRID, 0.05), _log(shifted, 0.05), tol)
    assert result["position_mean_x_mm"] == pytest.approx(offset, abs=0.02)
    assert result["position_mean_y_mm"] == pytest.approx(offset, abs=0.02)
    assert result["pairing"]["spots_matched"] == len(GRID)
    if passes:
        assert result["flags"] == []
    else:
        assert [f.split(" +")[0] for f in result["flags"]] == ["position mean x", "position mean y"]


@pytest.mark.parametrize(("delivered_mu", "passes"), [(0.0053, True), (0.0065, False)])
def test_small_spot_mu_floor(tol: dict, delivered_mu: float, passes: bool) -> None:
    """A 0.005 MU spot 6 % high (0.0003 MU) is within the 0.0005 MU floor; 30 % high is not."""
    mus = [0.05] * (len(GRID) - 1) + [0.005]
    delivered = [*mus[:-1], delivered_mu]
    tol = dict(tol, layer_mu_percent=5.0)
    result = _check(_layer(GRID, mus), _log(GRID, delivered), tol)
    assert result["spots_mu_outside"] == (0 if passes else 1)
    assert (result["flags"] == []) is passes
    if not passes:
        assert "1 spot(s) off in MU, worst +30.0 %" in result["flags"][0]


def test_undelivered_and_stray_spots_fail(tol: dict) -> None:
    stray = [*GRID[:-1], (150.0, 150.0)]
    result = _check(_layer(GRID, 0.05), _log(stray, 0.05), tol)
    assert result["pairing"]["planned_spots_not_delivered"] == 1 and result["pairing"]["visits_unmatched"] == 1
    assert any("1 planned spot(s) not delivered" in f for f in result["flags"])
    assert any("MU logged farther than 10 mm" in f for f in result["flags"])


def test_a_mirrored_log_is_named(tol: dict) -> None:
    asymmetric = [(x + 30.0, y) for x, y in GRID]  # a field off the axis: a mirror moves it 60 mm
    wrong = dataclasses.replace(CAL, x_sign=1.0)  # reads the G2 log without its mirror
    result = _check(_layer(asymmetric, 0.05), _log(asymmetric, 0.05), tol, wrong)
    assert result["flags"] and any("x mirrored" in note for note in result["notes"])


# --- LINE scanning -------------------------------------------------------------------------------


def _line_rows(path: list[tuple[float, float, float, float, float]], dy: float = 0.0, per_mm: int = 10) -> np.ndarray:
    """The beam sweeping each segment at constant speed, dose spread evenly, off in between."""
    blocks = []
    for x0, y0, x1, y1, mu in path:
        n = max(2, round(per_mm * np.hypot(x1 - x0, y1 - y0)))
        t = np.linspace(0.0, 1.0, n)
        rows = np.zeros((n + 3, 8), dtype=np.int64)
        rows[:n, 0] = np.rint(CAL.raw_x(x0 + t * (x1 - x0)))
        rows[:n, 1] = np.rint(CAL.raw_y(y0 + t * (y1 - y0) + dy))
        rows[:n, 4] = np.rint(mu / CAL.mu_per_count(ENERGY) / n)
        rows[:n, 7] = ptn.FLAG_PLANNED_BEAM_ON | ptn.FLAG_ACTUAL_BEAM_ON | 1
        rows[n:, 0:2] = rows[n - 1, 0:2]
        blocks.append(rows)
    return np.concatenate(blocks)


LINES = [(-30.0, 10.0, 30.0, 10.0, 0.4), (30.0, 0.0, -30.0, 0.0, 0.2), (-30.0, -10.0, 30.0, -25.0, 0.3)]


@pytest.mark.parametrize(("dy", "passes"), [(0.0, True), (0.8, True), (1.2, False)])
def test_line_scanning_compares_the_path_and_the_mu_along_it(tol: dict, dy: float, passes: bool) -> None:
    layer = Layer(energy_mev=ENERGY, mu=0.9, line_segments=LINES)
    result = _check(layer, _line_rows(LINES, dy), tol, mode="LINE")
    assert result["method"] == "line path"
    assert result["pairing"]["segments_reached"] == 3
    assert result["position_mean_y_mm"] == pytest.approx(dy, abs=0.05)
    assert abs(result["spot_mu_max_diff_percent"]) < 1.0
    assert (result["flags"] == []) is passes


def test_line_scanning_names_a_segment_delivered_short(tol: dict) -> None:
    delivered = [*LINES[:2], (*LINES[2][:4], 0.24)]  # the last line 20 % short
    result = _check(Layer(energy_mev=ENERGY, mu=0.9, line_segments=LINES), _line_rows(delivered), tol, mode="LINE")
    assert any("1 spot(s) off in MU, worst -20.0 %" in f for f in result["flags"])


def test_scan_modes_without_spots_are_not_assessed_by_name(tol: dict) -> None:
    beam = Beam(2, "W", "", "G2", "TREATMENT", False, 0.0, (0.0, 0.0, 0.0), None, 0, [], scan_mode="UNIFORM")
    result = delivery.check_beam(beam, [{"folder": "x"}], Path("."), delivery.RoomCheck(CAL, [1.0] * 5, tol))
    assert result["verdict"] == "NOT ASSESSED" and "scan mode UNIFORM" in result["reasons"][0]


def test_two_visits_nearest_one_spot_still_pair_with_two_spots() -> None:
    planned = np.array([[0.0, 0.0], [10.0, 0.0]])
    xy = np.array([[4.0, 0.0], [4.5, 0.0]])  # both nearest the first spot
    visits = spot_match.Visits(xy, np.ones(2), np.ones(2, np.int64), np.arange(2))
    assert spot_match.assign(visits, planned, 10.0).tolist() == [0, 1]
    assert spot_match.assign(visits, planned, 5.0).tolist() == [0, -1]  # 5.5 mm: beyond the gate

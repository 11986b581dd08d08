"""Gamma against the reference implementation, pymedphys.gamma (the test oracle)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from mqi_communicator.qa.gamma import Criteria, gamma_2d, search_distances

pymedphys = pytest.importorskip("pymedphys")

AXIS = np.arange(120) * 1.0 - 59.5
X, Z = np.meshgrid(AXIS, AXIS, indexing="ij")


def field(shift_x: float = 0.0, shift_z: float = 0.0, edge: float = 25.0) -> np.ndarray:
    """A square field with a 3 mm penumbra, a slope and a low-dose halo (asymmetric on purpose)."""
    inside = (1 / (1 + np.exp(-(edge - np.abs(X - shift_x)) / 3.0))) * (
        1 / (1 + np.exp(-(edge - np.abs(Z - shift_z)) / 3.0))
    )
    return 2.0 * (inside * (1 + 0.1 * (X - shift_x) / edge) + 0.06 * np.exp(-(X**2 + Z**2) / 1800.0))


RNG = np.random.default_rng(11)
REFERENCE = field()
PLANES = {
    "identical": REFERENCE.copy(),
    "smooth 1 mm shift": field(shift_x=1.0),
    "smooth 2 % high": REFERENCE * 1.02,
    "noisy 2 %": np.clip(field(0.5, -0.5) * (1 + RNG.normal(0, 0.02, REFERENCE.shape)), 0, None),
    "noisy 6 % and shifted": np.clip(field(2.0, 0.0) * (1 + RNG.normal(0, 0.06, REFERENCE.shape)), 0, None),
    "gross failure": field(shift_x=8.0, shift_z=-5.0) * 1.25,
    "half the field missing": np.where(Z > 0, REFERENCE, 0.0),
}


def oracle(dose_ref, dose_eval, criteria: Criteria, axes_ref=(AXIS, AXIS), axes_eval=(AXIS, AXIS)) -> np.ndarray:
    return pymedphys.gamma(
        axes_ref,
        dose_ref,
        axes_eval,
        dose_eval,
        criteria.dose_percent,
        criteria.distance_mm,
        lower_percent_dose_cutoff=criteria.cutoff_percent,
        max_gamma=criteria.max_gamma,
        local_gamma=criteria.local,
        interp_algo="scipy",  # numba is not a dependency here
    )


def pass_rate(gamma: np.ndarray) -> float:
    valid = gamma[np.isfinite(gamma)]
    return 100.0 * float(np.sum(valid <= 1)) / valid.size


def assert_same(ours, theirs: np.ndarray) -> None:
    assert np.array_equal(np.isnan(ours.gamma), np.isnan(theirs)), "different points evaluated"
    flips = int(np.sum((ours.gamma <= 1) != (theirs <= 1)))
    assert flips == 0, f"{flips} points flip between pass and fail"
    assert ours.pass_rate == pytest.approx(pass_rate(theirs), abs=0.1)
    assert np.nanmax(np.abs(ours.gamma - theirs)) < 1e-9


@pytest.mark.parametrize("name", list(PLANES))
@pytest.mark.parametrize(
    "criteria",
    [Criteria(3, 2), Criteria(2, 2), Criteria(3, 2, local=True), Criteria(2, 1, cutoff_percent=20, max_gamma=3)],
    ids=lambda c: c.label.replace(" ", "-"),
)
def test_gamma_equals_pymedphys(name: str, criteria: Criteria) -> None:
    ours = gamma_2d((AXIS, AXIS), REFERENCE, (AXIS, AXIS), PLANES[name], criteria)
    assert_same(ours, oracle(REFERENCE, PLANES[name], criteria))


def test_the_planes_span_passing_to_failing() -> None:
    rates = {
        name: gamma_2d((AXIS, AXIS), REFERENCE, (AXIS, AXIS), plane, Criteria()).pass_rate
        for name, plane in PLANES.items()
    }
    assert rates["identical"] == 100.0
    assert rates["gross failure"] < 50.0
    assert 50.0 < rates["noisy 6 % and shifted"] < 99.0


@pytest.mark.parametrize(("shift_mm", "scale"), [(1.0, 1.0), (7.0, 1.3)], ids=["near", "gross-failure"])
@pytest.mark.parametrize("criteria", [Criteria(3, 2), Criteria(2, 2, local=True)], ids=lambda c: c.label)
def test_gamma_on_a_different_evaluated_grid_equals_pymedphys(
    shift_mm: float, scale: float, criteria: Criteria
) -> None:
    # The evaluated grid is offset by half a pixel and coarser: every point has its own weights
    # (and, failing grossly, most points end early on a window bound).
    axis_eval = np.arange(80) * 1.5 - 59.0
    xe, ze = np.meshgrid(axis_eval, axis_eval, indexing="ij")
    noise = 1 + RNG.normal(0, 0.01, xe.shape)
    evaluated = scale * 2.0 * np.exp(-(((xe - shift_mm) / 22.0) ** 6 + (ze / 20.0) ** 6)) * noise
    reference = 2.0 * np.exp(-((X / 22.0) ** 6 + (Z / 20.0) ** 6))
    ours = gamma_2d((AXIS, AXIS), reference, (axis_eval, axis_eval), evaluated, criteria)
    assert_same(ours, oracle(reference, evaluated, criteria, axes_eval=(axis_eval, axis_eval)))


def test_gamma_keeps_to_the_calling_thread() -> None:
    # A clinic workstation is never idle: BLAS threads for the thin stencil products cost three
    # times the CPU for the same work. CPU time of this process's other threads must not grow.
    def other_threads_ticks() -> int:
        ticks = 0
        for task in Path("/proc/self/task").iterdir():
            if task.name != str(threading.get_native_id()):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks

    axis = np.arange(300) * 1.0
    x, z = np.meshgrid(axis - 150, axis - 150, indexing="ij")
    reference = 2.0 * np.exp(-((x / 60.0) ** 6 + (z / 60.0) ** 6))
    evaluated = 1.3 * 2.0 * np.exp(-(((x - 6.0) / 60.0) ** 6 + (z / 60.0) ** 6))
    before = other_threads_ticks()
    for _ in range(5):
        gamma_2d((axis, axis), reference, (axis, axis), evaluated * (1 + RNG.normal(0, 0.03, x.shape)), Criteria(2, 2))
    # Threaded products give tens of ticks here; a tick or two may be another thread of pytest.
    assert other_threads_ticks() - before <= 2


def test_uniform_error_within_tolerance_passes_and_beyond_fails_everywhere() -> None:
    # Gamma of a pure 2.9 % / 3.1 % scaling on a flat plane: every point passes / fails at 3 %/2 mm.
    flat = np.ones((40, 40))
    axis = np.arange(40) * 1.0
    assert gamma_2d((axis, axis), flat, (axis, axis), flat * 1.029, Criteria(3, 2)).pass_rate == 100.0
    assert gamma_2d((axis, axis), flat, (axis, axis), flat * 1.031, Criteria(3, 2)).pass_rate == 0.0


def test_search_distances_force_the_dta_and_stop_at_max_gamma() -> None:
    distances = search_distances(Criteria(3, 2, max_gamma=2))
    assert distances[0] == 0.0 and 2.0 in distances and distances[-1] <= 4.0
    assert np.all(np.diff(distances) > 0)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Criteria(0, 2)
    with pytest.raises(ValueError, match="max_gamma"):
        Criteria(3, 2, max_gamma=0.5)
    with pytest.raises(ValueError, match="evenly spaced"):
        gamma_2d((AXIS[::-1], AXIS), REFERENCE, (AXIS, AXIS), REFERENCE, Criteria())
    with pytest.raises(ValueError, match="NaN"):
        gamma_2d((AXIS, AXIS), REFERENCE, (AXIS, AXIS), REFERENCE * np.nan, Criteria())


def test_reference_reaching_beyond_the_evaluated_grid_equals_pymedphys() -> None:
    # Evaluated grid: an aligned sub-window; reference points outside it get NaN or edge values.
    sub = slice(40, 80)  # +-20 mm: cuts through the 50 mm field
    evaluated = PLANES["noisy 2 %"][sub, sub]
    axes_eval = (AXIS[sub], AXIS[sub])
    ours = gamma_2d((AXIS, AXIS), REFERENCE, axes_eval, evaluated, Criteria(3, 2))
    assert_same(ours, oracle(REFERENCE, evaluated, Criteria(3, 2), axes_eval=axes_eval))
    assert np.isnan(ours.gamma[0, 0]) and ours.evaluated < np.sum(0.1 * REFERENCE.max() <= REFERENCE)

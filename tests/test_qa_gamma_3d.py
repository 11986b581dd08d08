"""3-D gamma against the reference implementation, pymedphys.gamma (the test oracle), on volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import erf

from mqi_communicator.qa.gamma import Criteria, gamma_2d
from mqi_communicator.qa.gamma_3d import gamma_3d
from mqi_communicator.qa.gamma_sphere import sphere

pymedphys = pytest.importorskip("pymedphys")

# A small proton field on a 2 mm grid: lateral axes 0 and 1, depth along axis 2 (entrance
# plateau, high-dose region, distal fall-off at ~36 mm), asymmetric on purpose.
LATERAL = np.arange(18) * 2.0 - 17.0
DEPTH = np.arange(24) * 2.0 + 1.0
AXES = (LATERAL, LATERAL, DEPTH)


def field(axes=AXES, shift_mm: float = 0.0, range_mm: float = 36.0, scale: float = 1.0) -> np.ndarray:
    x, y, depth = np.meshgrid(*axes, indexing="ij")
    lateral = 0.25 * (1 + erf((11 - np.abs(x - shift_mm)) / 4.0)) * (1 + erf((9 - np.abs(y)) / 4.0))
    plateau = 0.5 + 0.5 / (1 + np.exp(-(depth - 20.0) / 4.0))
    fall = 0.5 * (1 - erf((depth - range_mm) / 3.5))
    return 2.0 * scale * lateral * plateau * fall * (1 + 0.01 * x)


RNG = np.random.default_rng(5)
REFERENCE = field()
VOLUMES = {
    "identical": REFERENCE.copy(),
    "Monte Carlo-like (2 % noise, 1 mm deeper)": np.clip(
        field(shift_mm=0.5, range_mm=37.0) * (1 + RNG.normal(0, 0.02, REFERENCE.shape)), 0, None
    ),
    "distal error (range 5 mm short)": field(range_mm=31.0),
}
GROSS = field(shift_mm=6.0, range_mm=33.0, scale=1.2)


def oracle(dose_ref, dose_eval, criteria: Criteria, axes_ref=AXES, axes_eval=AXES) -> np.ndarray:
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
    assert ours.pass_rate == pytest.approx(pass_rate(theirs), abs=1e-9)
    assert np.nanmax(np.abs(ours.gamma - theirs)) < 1e-9


@pytest.mark.parametrize("name", list(VOLUMES))
@pytest.mark.parametrize("criteria", [Criteria(3, 2), Criteria(2, 2, local=True)], ids=lambda c: c.label)
def test_gamma_3d_equals_pymedphys(name: str, criteria: Criteria) -> None:
    ours = gamma_3d(AXES, REFERENCE, AXES, VOLUMES[name], criteria)
    assert_same(ours, oracle(REFERENCE, VOLUMES[name], criteria))


def test_gamma_3d_of_a_gross_failure_equals_pymedphys() -> None:
    # Most points search to max_gamma x DTA: the window and band bounds do most of the work.
    ours = gamma_3d(AXES, REFERENCE, AXES, GROSS, Criteria(3, 2))
    assert_same(ours, oracle(REFERENCE, GROSS, Criteria(3, 2)))
    assert ours.pass_rate < 50.0


def test_gamma_3d_with_other_criteria_equals_pymedphys() -> None:
    criteria = Criteria(2, 1, cutoff_percent=20, max_gamma=3)
    evaluated = VOLUMES["Monte Carlo-like (2 % noise, 1 mm deeper)"]
    assert_same(gamma_3d(AXES, REFERENCE, AXES, evaluated, criteria), oracle(REFERENCE, evaluated, criteria))


@pytest.mark.parametrize(
    "axes_eval",
    [
        tuple(a - 1.0 for a in AXES),  # shifted by half a step: one shared fraction past the nodes
        # 1.5 mm, offset: the points sit at 3 x 3 x 3 different fractions of a step past a node
        (np.arange(24) * 1.5 - 17.6, np.arange(24) * 1.5 - 17.8, np.arange(34) * 1.5 - 0.7),
        # coarser and offset: 5 x 5 x 5 fractions, each point interpolated on its own
        (np.arange(15) * 2.5 - 18.3, np.arange(15) * 2.5 - 18.1, np.arange(20) * 2.5 - 0.2),
    ],
    ids=["half-step shift", "1.5 mm grid", "coarser offset grid"],
)
def test_gamma_3d_on_another_evaluated_grid_equals_pymedphys(axes_eval) -> None:
    # The evaluated grid does not hold the reference points: part of the reference reaches
    # beyond it (NaN or edge values), and the points sit between its nodes.
    evaluated = np.clip(
        field(axes_eval, range_mm=37.5) * (1 + RNG.normal(0, 0.02, [a.size for a in axes_eval])), 0, None
    )
    ours = gamma_3d(AXES, REFERENCE, axes_eval, evaluated, Criteria(3, 2))
    assert_same(ours, oracle(REFERENCE, evaluated, Criteria(3, 2), axes_eval=axes_eval))


def test_a_distal_error_fails_in_3d_but_passes_on_the_entrance_plane() -> None:
    # The motivating case: the plane at 2 cm depth lies in the entrance plateau, where a range
    # error changes nothing; the volume sees the distal fall-off move.
    evaluated = VOLUMES["distal error (range 5 mm short)"]
    plane = int(np.argmin(np.abs(DEPTH - 20.0)))
    on_plane = gamma_2d(AXES[:2], REFERENCE[:, :, plane], AXES[:2], evaluated[:, :, plane], Criteria(3, 2))
    in_volume = gamma_3d(AXES, REFERENCE, AXES, evaluated, Criteria(3, 2))
    assert on_plane.pass_rate == 100.0
    assert in_volume.pass_rate < 90.0


def test_sphere_points_are_pymedphys_own() -> None:
    from pymedphys._utilities.createshells import calculate_coordinates_shell

    for distance, step in ((0.0, 0.2), (0.2, 0.2), (1.4, 0.2), (2.0, 0.2), (3.3, 0.25)):
        theirs = calculate_coordinates_shell(distance, 3, step)
        for ours_axis, their_axis in zip(sphere(distance, step), theirs, strict=True):
            assert np.array_equal(ours_axis, their_axis)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="3-D"):
        gamma_3d(AXES[:2], REFERENCE[:, :, 0], AXES[:2], REFERENCE[:, :, 0], Criteria())
    with pytest.raises(ValueError, match="evenly spaced"):
        gamma_3d((LATERAL[::-1], LATERAL, DEPTH), REFERENCE, AXES, REFERENCE, Criteria())
    with pytest.raises(ValueError, match="NaN"):
        gamma_3d(AXES, REFERENCE, AXES, REFERENCE * np.nan, Criteria())


def test_a_subset_is_the_points_pymedphys_draws() -> None:
    # pymedphys' random_subset shuffles the points above the cutoff with numpy's global generator.
    evaluated = VOLUMES["Monte Carlo-like (2 % noise, 1 mm deeper)"]
    above = np.flatnonzero(REFERENCE.ravel() >= 0.1 * REFERENCE.max())
    np.random.seed(3)
    np.random.shuffle(above)
    mask = np.zeros(REFERENCE.size, dtype=bool)
    mask[above[:500]] = True
    ours = gamma_3d(AXES, REFERENCE, AXES, evaluated, Criteria(2, 2), subset=mask.reshape(REFERENCE.shape))
    np.random.seed(3)
    theirs = pymedphys.gamma(
        AXES,
        REFERENCE,
        AXES,
        evaluated,
        2,
        2,
        lower_percent_dose_cutoff=10,
        max_gamma=2,
        interp_algo="scipy",
        random_subset=500,
    )
    assert ours.evaluated == 500
    assert_same(ours, theirs)

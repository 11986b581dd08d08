"""The gamma index of a 2-D dose plane, by the definition of `pymedphys.gamma`, vectorised.

Definition (pymedphys 0.41 `gamma_shell`, the field's reference implementation, our test
oracle): every reference point at or above the low-dose cutoff is the centre of a search. At
the distances 0, s, 2s, ... (s = DTA / interp_fraction, each DTA forced into the sequence, the
step growing as distance / interp_fraction / max_gamma), the evaluated dose is bilinearly
interpolated on a circle of ceil(2 pi r / s) + 1 points; gamma at r is
sqrt((min |D_eval - D_ref| / (dd * norm))^2 + (r / DTA)^2) and gamma is the minimum over r.
A point stops once gamma <= r / DTA (no larger circle can lower it); the search ends at
max_gamma x DTA, gamma above max_gamma is reported as max_gamma, a point with no evaluated
dose within reach as NaN. Global gamma normalises to the reference maximum (or a given value),
local gamma to the reference dose at the point.

Speed (qa/gamma_search.py, qa/gamma_common.py do the search): the same circles, evaluated for
all still-searching points at once, in units of the dose criterion and squared (the root is
taken once at the end).
Where the reference points sit on evaluated grid nodes (the same grid, the usual case) a circle's
interpolation weights are the same for every point: one gather of the nodes it touches and one
small matrix product per circle. Two exact bounds, from the minimum/maximum of the evaluated
dose over the window that holds a circle (or the whole search), skip a circle for a point, or
end a point's search, when they prove it cannot lower what that point reports; they are tried
where they pay off (many points at max_gamma) and paused where they spare few points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mqi_communicator.errors import InputError
from mqi_communicator.qa.gamma_common import Points
from mqi_communicator.qa.gamma_search import PaddedGrid, search


@dataclass(frozen=True)
class Criteria:
    """One gamma criterion: dose difference (percent), distance to agreement (mm) and options."""

    dose_percent: float = 3.0
    distance_mm: float = 2.0
    cutoff_percent: float = 10.0
    local: bool = False
    max_gamma: float = 2.0
    interp_fraction: int = 10
    global_normalisation: float | None = None

    def __post_init__(self) -> None:
        if not (self.dose_percent > 0 and self.distance_mm > 0):
            raise InputError(f"gamma criteria must be positive, not {self.dose_percent}%/{self.distance_mm} mm")
        if not self.max_gamma >= 1:
            raise InputError(f"max_gamma must be at least 1 (pass/fail is decided at 1), not {self.max_gamma}")
        if self.interp_fraction < 1:
            raise InputError(f"interp_fraction must be at least 1, not {self.interp_fraction}")

    @property
    def label(self) -> str:
        kind = "local" if self.local else "global"
        return f"{self.dose_percent:g}%/{self.distance_mm:g}mm {kind}"


@dataclass(frozen=True)
class GammaResult:
    """Gamma per reference point (NaN where not evaluated) and the pass rate (percent)."""

    gamma: np.ndarray
    criteria: Criteria
    evaluated: int
    passed: int

    @property
    def pass_rate(self) -> float:
        return 100.0 * self.passed / self.evaluated if self.evaluated else float("nan")

    def summary(self) -> dict[str, Any]:
        valid = self.gamma[np.isfinite(self.gamma)]
        return {
            "criteria": self.criteria.label,
            "dose_percent": self.criteria.dose_percent,
            "distance_mm": self.criteria.distance_mm,
            "cutoff_percent": self.criteria.cutoff_percent,
            "local": self.criteria.local,
            "pass_rate_percent": round(self.pass_rate, 3) if self.evaluated else None,
            "points_evaluated": self.evaluated,
            "points_passed": self.passed,
            "gamma_mean": float(valid.mean()) if valid.size else None,
            "gamma_p95": float(np.percentile(valid, 95)) if valid.size else None,
        }


def search_distances(criteria: Criteria) -> list[float]:
    """The distances pymedphys searches (one criterion), up to max_gamma x DTA."""
    dta, fraction, max_gamma = criteria.distance_mm, criteria.interp_fraction, criteria.max_gamma
    distances, distance, forced = [], 0.0, [dta]
    while distance <= dta * max_gamma:
        distances.append(distance)
        step = max(distance / fraction / max_gamma, dta / fraction)
        distance += step
        if forced and distance >= forced[0]:
            distance = forced.pop(0)
    return distances


def _axis(values: Any, size: int, name: str) -> tuple[float, float]:
    axis = np.asarray(values, dtype=np.float64)
    if axis.ndim != 1 or axis.size != size or size < 2:
        raise InputError(f"{name} axis has {axis.size} values for {size} pixels (at least 2 needed)")
    steps = np.diff(axis)
    # As np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9), without its overhead (a hot path).
    if not (steps > 0).all() or np.abs(steps - steps[0]).max() > 1e-9 + 1e-6 * abs(steps[0]):
        raise InputError(f"{name} axis must be ascending and evenly spaced")
    return float(axis[0]), float(steps[0])


def _all_finite(dose: np.ndarray) -> bool:
    # One sum is far cheaper than a mask; only an overflowing sum needs the element-wise check.
    return bool(np.isfinite(dose.sum()) or np.isfinite(dose).all())


def _checked_doses(
    axes_reference: Any, dose_reference: np.ndarray, axes_evaluation: Any, dose_evaluation: np.ndarray, ndim: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]], list[tuple[float, float]]]:
    """Both doses as float arrays of `ndim` dimensions, all finite, and the (first coordinate,
    step) of each axis of each grid; a ValueError saying what is wrong otherwise."""
    kind = "planes" if ndim == 2 else "volumes"
    reference = np.asarray(dose_reference, dtype=np.float64)
    full = np.asarray(dose_evaluation, dtype=np.float64)
    if reference.ndim != ndim or full.ndim != ndim:
        raise InputError(f"gamma_{ndim}d takes two {ndim}-D dose {kind}")
    if not (_all_finite(reference) and _all_finite(full)):
        raise InputError(f"dose {kind} must not contain NaN or infinite values")
    ref_axes = [_axis(axes_reference[a], reference.shape[a], f"reference axis {a}") for a in range(ndim)]
    eval_axes = [_axis(axes_evaluation[a], full.shape[a], f"evaluated axis {a}") for a in range(ndim)]
    return reference, full, ref_axes, eval_axes


def _cutoff_points(
    reference: np.ndarray, criteria: Criteria, subset: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """The dose gamma normalises to and the flat indices of the reference points at or above the
    low-dose cutoff (and in `subset`, a boolean mask of the reference grid, where given); no
    points where that dose is not positive."""
    norm = float(reference.max()) if criteria.global_normalisation is None else float(criteria.global_normalisation)
    if norm <= 0:
        return norm, np.empty(0, dtype=np.intp)
    above = reference >= criteria.cutoff_percent / 100 * norm
    if subset is not None:
        if np.shape(subset) != reference.shape:
            raise InputError(f"subset has shape {np.shape(subset)}, the reference {reference.shape}")
        above &= np.asarray(subset, dtype=bool)
    return norm, np.flatnonzero(above.ravel())


def _gamma_result(shape: tuple[int, ...], points: np.ndarray, squared: np.ndarray, criteria: Criteria) -> GammaResult:
    """The result from the search's gamma squared of the `points` (flat indices; inf: no evaluated
    dose within reach, reported as NaN), capped at max_gamma."""
    gamma = np.full(shape, np.nan)
    values = np.where(np.isinf(squared), np.nan, np.minimum(np.sqrt(squared), criteria.max_gamma))
    gamma.ravel()[points] = values
    finite = np.isfinite(values)
    return GammaResult(gamma, criteria, int(finite.sum()), int((values[finite] <= 1.0).sum()))


def gamma_2d(
    axes_reference: tuple[Any, Any],
    dose_reference: np.ndarray,
    axes_evaluation: tuple[Any, Any],
    dose_evaluation: np.ndarray,
    criteria: Criteria,
) -> GammaResult:
    """Gamma of `dose_evaluation` against `dose_reference` (2-D, axes as pymedphys takes them)."""
    reference, full, ((r0, s0), (r1, s1)), ((o0, e0), (o1, e1)) = _checked_doses(
        axes_reference, dose_reference, axes_evaluation, dose_evaluation, 2
    )
    distances = search_distances(criteria)
    norm, points = _cutoff_points(reference, criteria)
    if points.size == 0:
        return GammaResult(np.full(reference.shape, np.nan), criteria, 0, 0)
    p0, p1 = np.divmod(points, reference.shape[1])
    u0 = (r0 + s0 * p0 - o0) / e0
    u1 = (r1 + s1 * p1 - o1) / e1
    c0, c1 = np.rint(u0).astype(np.intp), np.rint(u1).astype(np.intp)
    centre_inside = (c0 >= 0) & (c0 < full.shape[0]) & (c1 >= 0) & (c1 < full.shape[1])
    on_nodes = bool(
        centre_inside.all()
        and np.abs(u0 - c0).max() < 1e-9
        and np.abs(u1 - c1).max() < 1e-9
        and abs(s0 - e0) <= 1e-8 + 1e-5 * abs(e0)  # np.isclose, without its overhead
        and abs(s1 - e1) <= 1e-8 + 1e-5 * abs(e1)
    )
    # Only the points' box plus the reach is ever looked at: crop the evaluated dose to it (a
    # circle leaves the crop only where the crop ends at the grid's own edge).
    k0_max, k1_max = math.ceil(distances[-1] / e0) + 2, math.ceil(distances[-1] / e1) + 2
    cc0, cc1 = np.clip(c0, 0, full.shape[0] - 1), np.clip(c1, 0, full.shape[1] - 1)
    lo = (max(int(cc0.min()) - k0_max, 0), max(int(cc1.min()) - k1_max, 0))
    hi = (min(int(cc0.max()) + k0_max + 1, full.shape[0]), min(int(cc1.max()) + k1_max + 1, full.shape[1]))
    # Doses in units of the dose criterion (global: of dd x norm; local: of dd, the reference
    # dose of each point then divides the squared difference).
    unit = criteria.dose_percent / 100 * (1.0 if criteria.local else norm)
    grid = PaddedGrid(full[lo[0] : hi[0], lo[1] : hi[1]] / unit, pad=max(k0_max, k1_max))
    searching = Points.start(
        reference.ravel()[points],
        unit,
        criteria.local,
        cell=grid.index(cc0 - lo[0], cc1 - lo[1]),
        centre_inside=None if on_nodes else centre_inside,
        group=None,
        mm=None if on_nodes else np.stack([r0 + s0 * p0.astype(np.float64), r1 + s1 * p1.astype(np.float64)]),
    )
    axis0, axis1 = (np.asarray(a, dtype=np.float64) for a in axes_evaluation)
    geometry = (
        float(axis0[lo[0]]),
        float(axis0[lo[0] + 1] - axis0[lo[0]]),
        float(axis1[lo[1]]),
        float(axis1[lo[1] + 1] - axis1[lo[1]]),
    )
    edges = (float(axis0[0]), float(axis0[-1]), float(axis1[0]), float(axis1[-1]))
    squared = search(grid, searching, distances, criteria, (e0, e1), geometry, edges)
    return _gamma_result(reference.shape, points, squared, criteria)

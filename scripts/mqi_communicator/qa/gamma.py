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

Speed: the same circles, evaluated for all still-searching points at once, and a circle is
skipped for a point when the minimum/maximum of the evaluated dose over the window that holds
the circle proves it cannot lower that point's gamma (exact: it never changes a result).
Where the reference points sit on evaluated grid nodes (the same grid, the usual case) the
interpolation weights are the same for every point and the evaluated dose is gathered from a
NaN-padded copy; otherwise each point gets its own weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

# (offsets x points) elements evaluated at once: bounds the memory to ~100 MB at any plane size.
_CHUNK = 1 << 21


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
            raise ValueError(f"gamma criteria must be positive, not {self.dose_percent}%/{self.distance_mm} mm")
        if not self.max_gamma >= 1:
            raise ValueError(f"max_gamma must be at least 1 (pass/fail is decided at 1), not {self.max_gamma}")
        if self.interp_fraction < 1:
            raise ValueError(f"interp_fraction must be at least 1, not {self.interp_fraction}")

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


def circle(distance: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (axis 0, axis 1) of the points on a circle, as pymedphys places them."""
    count = int(np.ceil(2 * np.pi * distance / step)) + 1
    theta = np.linspace(0, 2 * np.pi, count + 1)[:-1]
    return distance * np.cos(theta), distance * np.sin(theta)


def _axis(values: Any, size: int, name: str) -> tuple[float, float]:
    axis = np.asarray(values, dtype=np.float64)
    if axis.ndim != 1 or axis.size != size or size < 2:
        raise ValueError(f"{name} axis has {axis.size} values for {size} pixels (at least 2 needed)")
    steps = np.diff(axis)
    if not np.all(steps > 0) or not np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9):
        raise ValueError(f"{name} axis must be ascending and evenly spaced")
    return float(axis[0]), float(steps[0])


class _Evaluated:
    """The evaluated dose, bilinear interpolation at fractional grid positions (u0, u1)."""

    def __init__(self, axes: tuple[Any, Any], dose: np.ndarray, pad: int) -> None:
        self.dose = np.asarray(dose, dtype=np.float64)
        self.n0, self.n1 = self.dose.shape
        self.origin0, self.step0 = _axis(axes[0], self.n0, "evaluated axis 0")
        self.origin1, self.step1 = _axis(axes[1], self.n1, "evaluated axis 1")
        self.pad = pad
        padded = np.full((self.n0 + 2 * pad, self.n1 + 2 * pad), np.nan)
        padded[pad : pad + self.n0, pad : pad + self.n1] = self.dose
        self.flat = padded.ravel()
        self.width = self.n1 + 2 * pad

    def window_bounds(self, lo: tuple[int, int], hi: tuple[int, int]) -> _WindowBounds:
        """Window minima/maxima over the crop [lo, hi) of the grid (the region the points need)."""
        return _WindowBounds(self.dose[lo[0] : hi[0], lo[1] : hi[1]])

    def min_difference_at_nodes(self, node: np.ndarray, d0: np.ndarray, d1: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """min over the offsets (d0, d1) (grid units) of |dose - ref| around the nodes `node`
        (flat, padded indices); NaN where every offset falls outside the grid.

        The weights are the same for every point, so the nodes a circle touches are gathered
        once (one row per node) and each interpolation is a weighted sum of at most four rows
        (no BLAS: its threads only slow a busy machine down). A zero weight is left out:
        pymedphys counts a point on the grid's edge as inside.
        """
        f0, f1 = np.floor(d0).astype(np.intp), np.floor(d1).astype(np.intp)
        w0, w1 = d0 - f0, d1 - f1
        terms = []
        for k in range(d0.size):
            corners = (
                (f0[k], f1[k], (1.0 - w0[k]) * (1.0 - w1[k])),
                (f0[k], f1[k] + 1, (1.0 - w0[k]) * w1[k]),
                (f0[k] + 1, f1[k], w0[k] * (1.0 - w1[k])),
                (f0[k] + 1, f1[k] + 1, w0[k] * w1[k]),
            )
            terms.append([(int(a) * self.width + int(b), float(w)) for a, b, w in corners if w != 0.0])
        rows = sorted({shift for offset in terms for shift, _ in offset})
        row_of = {shift: r for r, shift in enumerate(rows)}
        index = node[None, :] + np.asarray(rows, dtype=np.intp)[:, None]
        nodes = self.flat[index]  # NaN in the border: a term that reaches it makes the value NaN
        best = np.full(node.size, np.nan)
        value = np.empty(node.size)
        for offset in terms:
            np.multiply(nodes[row_of[offset[0][0]]], offset[0][1], out=value)
            for shift, weight in offset[1:]:
                value += nodes[row_of[shift]] * weight
            value -= ref
            np.abs(value, out=value)
            np.fmin(best, value, out=best)
        return best

    def at_points(self, x0: np.ndarray, x1: np.ndarray, bounds: tuple[float, float, float, float]) -> np.ndarray:
        """Dose at positions (mm, any shape); NaN outside `bounds` (the whole evaluated grid's
        first and last coordinates, compared in mm exactly as pymedphys does)."""
        inside = (x0 >= bounds[0]) & (x0 <= bounds[1]) & (x1 >= bounds[2]) & (x1 <= bounds[3])
        u0 = (x0 - self.origin0) / self.step0
        u1 = (x1 - self.origin1) / self.step1
        i0 = np.clip(np.floor(u0), 0, self.n0 - 2).astype(np.intp)
        i1 = np.clip(np.floor(u1), 0, self.n1 - 2).astype(np.intp)
        w0, w1 = u0 - i0, u1 - i1
        base = (i0 + self.pad) * self.width + (i1 + self.pad)
        value = (self.flat[base] * (1 - w0) + self.flat[base + self.width] * w0) * (1 - w1) + (
            self.flat[base + 1] * (1 - w0) + self.flat[base + self.width + 1] * w0
        ) * w1
        return np.where(inside, value, np.nan)


class _WindowBounds:
    """Minimum and maximum of a dose over (2 k0 + 1) x (2 k1 + 1) windows, grown step by step.

    Windows compose (a window of half-width k grown by j is one of half-width k + j), so each
    larger window costs two 1-D filters of the previous one; at the edges of the grid a window
    holds only its in-grid part (mode "nearest").
    """

    def __init__(self, dose: np.ndarray) -> None:
        self.k = (0, 0)
        self.low = dose.copy()
        self.high = dose.copy()

    def grow_to(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        for axis, (new, old) in enumerate(((k0, self.k[0]), (k1, self.k[1]))):
            if new > old:
                size = 2 * (new - old) + 1
                self.low = ndimage.minimum_filter1d(self.low, size, axis=axis, mode="nearest")
                self.high = ndimage.maximum_filter1d(self.high, size, axis=axis, mode="nearest")
        self.k = (max(k0, self.k[0]), max(k1, self.k[1]))
        return self.low, self.high


def gamma_2d(
    axes_reference: tuple[Any, Any],
    dose_reference: np.ndarray,
    axes_evaluation: tuple[Any, Any],
    dose_evaluation: np.ndarray,
    criteria: Criteria,
) -> GammaResult:
    """Gamma of `dose_evaluation` against `dose_reference` (2-D, axes as pymedphys takes them)."""
    reference = np.asarray(dose_reference, dtype=np.float64)
    if reference.ndim != 2 or np.asarray(dose_evaluation).ndim != 2:
        raise ValueError("gamma_2d takes two 2-D dose planes")
    if not (np.all(np.isfinite(reference)) and np.all(np.isfinite(dose_evaluation))):
        raise ValueError("dose planes must not contain NaN or infinite values")
    r0, s0 = _axis(axes_reference[0], reference.shape[0], "reference axis 0")
    r1, s1 = _axis(axes_reference[1], reference.shape[1], "reference axis 1")
    distances = search_distances(criteria)
    reach = distances[-1]
    full = np.asarray(dose_evaluation, dtype=np.float64)
    o0, e0 = _axis(axes_evaluation[0], full.shape[0], "evaluated axis 0")
    o1, e1 = _axis(axes_evaluation[1], full.shape[1], "evaluated axis 1")

    norm = float(reference.max()) if criteria.global_normalisation is None else float(criteria.global_normalisation)
    gamma = np.full(reference.shape, np.nan)
    if norm <= 0:
        return GammaResult(gamma, criteria, 0, 0)
    points = np.flatnonzero(reference >= criteria.cutoff_percent / 100 * norm)
    if points.size == 0:
        return GammaResult(gamma, criteria, 0, 0)
    p0, p1 = np.divmod(points, reference.shape[1])
    ref_mm0 = np.asarray(axes_reference[0], dtype=np.float64)[p0]
    ref_mm1 = np.asarray(axes_reference[1], dtype=np.float64)[p1]
    u0 = (r0 + s0 * p0 - o0) / e0
    u1 = (r1 + s1 * p1 - o1) / e1
    ref_values = reference.ravel()[points]
    scale = (ref_values if criteria.local else np.full(points.size, norm)) * (criteria.dose_percent / 100)
    with np.errstate(divide="ignore"):
        inv_scale = 1.0 / scale
    c0, c1 = np.rint(u0).astype(np.intp), np.rint(u1).astype(np.intp)
    centre_inside = (c0 >= 0) & (c0 < full.shape[0]) & (c1 >= 0) & (c1 < full.shape[1])
    on_nodes = bool(
        centre_inside.all()
        and np.all(np.abs(u0 - c0) < 1e-9)
        and np.all(np.abs(u1 - c1) < 1e-9)
        and np.isclose(s0, e0)
        and np.isclose(s1, e1)
    )
    # Only the points' box plus the reach is ever looked at: crop the evaluated dose to it (a
    # circle leaves the crop only where the crop ends at the grid's own edge).
    k0_max, k1_max = math.ceil(reach / e0) + 2, math.ceil(reach / e1) + 2
    cc0, cc1 = np.clip(c0, 0, full.shape[0] - 1), np.clip(c1, 0, full.shape[1] - 1)
    lo = (max(int(cc0.min()) - k0_max, 0), max(int(cc1.min()) - k1_max, 0))
    hi = (min(int(cc0.max()) + k0_max + 1, full.shape[0]), min(int(cc1.max()) + k1_max + 1, full.shape[1]))
    crop = full[lo[0] : hi[0], lo[1] : hi[1]]
    axis0, axis1 = (np.asarray(a, dtype=np.float64) for a in axes_evaluation)
    bounds = (float(axis0[0]), float(axis0[-1]), float(axis1[0]), float(axis1[-1]))
    axes_crop = (axis0[lo[0] : hi[0]], axis1[lo[1] : hi[1]])
    pad = max(k0_max, k1_max)
    evaluated = _Evaluated(axes_crop, crop, pad=pad)
    c0, c1, cc0, cc1 = c0 - lo[0], c1 - lo[1], cc0 - lo[0], cc1 - lo[1]
    windows: _WindowBounds | None = None
    flat_centre = cc0 * evaluated.n1 + cc1
    crop_size = crop.size
    node = (c0 + pad) * evaluated.width + (c1 + pad)

    current = np.full(points.size, np.inf)
    active = np.arange(points.size)
    for index, distance in enumerate(distances):
        if active.size == 0:
            break
        off0, off1 = circle(distance, _shell_step(distances, index, criteria))
        distance_term = (distance / criteria.distance_mm) ** 2
        todo = active
        if active.size * off0.size > 4 * crop_size:  # the bound pays for itself only on big sets
            # Lower bound of |D_eval - D_ref| over the circle from the window that holds it.
            k0, k1 = (
                _half_width(distance / evaluated.step0, on_nodes),
                _half_width(distance / evaluated.step1, on_nodes),
            )
            windows = windows or evaluated.window_bounds((0, 0), (evaluated.n0, evaluated.n1))
            low, high = windows.grow_to(k0, k1)
            cell = flat_centre[active]
            ref_active = ref_values[active]
            bound = np.maximum(np.maximum(low.ravel()[cell] - ref_active, ref_active - high.ravel()[cell]), 0.0)
            bound = np.where(centre_inside[active], bound, 0.0)
            with np.errstate(invalid="ignore"):
                bound_gamma = np.sqrt((bound * inv_scale[active]) ** 2 + distance_term)
            # Gamma is reported up to max_gamma: a circle that cannot go below it is skipped too.
            todo = active[~(bound_gamma >= np.minimum(current[active], criteria.max_gamma))]
        chunk = max(1, _CHUNK // off0.size)
        for start in range(0, todo.size, chunk):
            part = todo[start : start + chunk]
            if on_nodes:
                diff = evaluated.min_difference_at_nodes(
                    node[part], off0 / evaluated.step0, off1 / evaluated.step1, ref_values[part]
                )
            else:
                values = evaluated.at_points(
                    ref_mm0[part][None, :] + off0[:, None], ref_mm1[part][None, :] + off1[:, None], bounds
                )
                diff = np.fmin.reduce(np.abs(values - ref_values[part]), axis=0)
            diff = np.where(np.isnan(diff), np.inf, diff)
            with np.errstate(invalid="ignore"):
                at_distance = np.sqrt((diff * inv_scale[part]) ** 2 + distance_term)
            current[part] = np.fmin(current[part], at_distance)
        active = active[current[active] > distance / criteria.distance_mm]

    values = np.where(np.isinf(current), np.nan, np.minimum(current, criteria.max_gamma))
    gamma.ravel()[points] = values
    finite = np.isfinite(values)
    return GammaResult(gamma, criteria, int(finite.sum()), int((values[finite] <= 1.0).sum()))


def _half_width(radius: float, on_nodes: bool) -> int:
    """Half-width (nodes) of a window holding every node a circle of `radius` (grid units) uses."""
    return math.floor(radius + 1e-6) + 1 if on_nodes else math.ceil(radius + 0.5) + 1


def _shell_step(distances: list[float], index: int, criteria: Criteria) -> float:
    """The step size pymedphys uses to place the points of the circle at distances[index]."""
    step_min = criteria.distance_mm / criteria.interp_fraction
    if index == 0:
        return step_min
    return max(distances[index - 1] / criteria.interp_fraction / criteria.max_gamma, step_min)

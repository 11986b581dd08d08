"""The gamma index of a 3-D dose volume, by the definition of `pymedphys.gamma`, vectorised.

The definition is the one `gamma.gamma_2d` follows (docs/gamma.md), with spheres for circles:
every reference point at or above the low-dose cutoff is the centre of a search over spheres of
radius 0, s, 2s, ... (s = DTA / interp_fraction, the DTA forced into the sequence, the step
growing as distance / interp_fraction / max_gamma) whose points pymedphys places in rows of
constant elevation (qa/gamma_sphere.py); the evaluated dose there is trilinearly interpolated;
gamma at r is sqrt((min |D_eval - D_ref| / (dd * norm))^2 + (r / DTA)^2), gamma is the minimum
over r, a point stops once gamma <= r / DTA, the search ends at max_gamma x DTA (gamma above it
is reported as max_gamma), a point with no evaluated dose within reach is NaN.

Speed: the spheres of all still-searching points at once, in units of the dose criterion and
squared; where the reference points share one position relative to the evaluated nodes, one
gather and a few small matrix products per sphere (qa/gamma_sphere.py). Two exact bounds from
the minimum/maximum of the evaluated dose over the window that holds a sphere (or the whole
search) skip a sphere for a point, or end its search, when they prove it cannot lower what the
point reports (the logic of qa/gamma_search.py, in three dimensions).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqi_communicator.errors import InputError
from mqi_communicator.qa.gamma import Criteria, GammaResult, _all_finite, _axis, search_distances
from mqi_communicator.qa.gamma_search import WindowBounds, _shell_step
from mqi_communicator.qa.gamma_sphere import (
    PaddedVolume,
    min_square_difference_at_nodes,
    min_square_difference_at_positions,
    node_stencils,
    sphere,
)

_NODE_CHUNK = 4096  # reference points whose spheres are interpolated at once on the nodes (~2 MB per row)
_MAX_FRACTIONS = 64  # distinct positions of the reference points between nodes that get stencils
_CHUNK = 1 << 20  # (sphere points x reference points) evaluated at once off the nodes (~8 MB per array)
_BOUND_MIN_SPHERE = 12  # smaller spheres are cheaper to evaluate than to bound
_BOUND_MIN_SPARED = 0.1  # a bound that spares fewer of the points is paused ...
_BOUND_PAUSE = 4  # ... for this many spheres
_RETIRE_GAIN = 8  # each point the whole search's windows end early saves tens of sphere points


@dataclass
class _Points:
    """The reference points still searching, as parallel arrays (compressed as points finish):
    index among all points, reference dose, gamma squared so far, local-gamma factor, flat index
    of the node they start from, and either which of the shared fractions they sit at or
    (off the nodes' paths) their positions in mm."""

    position: np.ndarray
    ref: np.ndarray
    factor: np.ndarray | None
    cell: np.ndarray
    centre_inside: np.ndarray | None
    group: np.ndarray | None
    mm: np.ndarray | None  # (3, points)
    squared: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.squared = np.full(self.position.size, np.inf)

    def select(self, keep: np.ndarray) -> _Points:
        chosen = copy.copy(self)
        for name, value in vars(self).items():
            if value is not None:
                setattr(chosen, name, value[..., keep])
        return chosen

    @property
    def size(self) -> int:
        return int(self.position.size)


@dataclass(frozen=True)
class _Geometry:
    """The cropped evaluated volume in mm, the whole grid's edges, and (when the reference points
    share a few) the fractions of a step past their node along each axis at which they sit."""

    origin: tuple[float, float, float]
    steps: tuple[float, float, float]
    edges: tuple[tuple[float, float], ...]
    fractions: tuple[tuple[float, float, float], ...] | None


def gamma_3d(
    axes_reference: tuple[Any, Any, Any],
    dose_reference: np.ndarray,
    axes_evaluation: tuple[Any, Any, Any],
    dose_evaluation: np.ndarray,
    criteria: Criteria,
    subset: np.ndarray | None = None,
) -> GammaResult:
    """Gamma of `dose_evaluation` against `dose_reference` (3-D, axes as pymedphys takes them);
    `subset` (a boolean mask of the reference grid) limits it to those points above the cutoff,
    as pymedphys' `random_subset` does with the points it draws."""
    reference = np.asarray(dose_reference, dtype=np.float64)
    full = np.asarray(dose_evaluation, dtype=np.float64)
    if reference.ndim != 3 or full.ndim != 3:
        raise InputError("gamma_3d takes two 3-D dose volumes")
    if not (_all_finite(reference) and _all_finite(full)):
        raise InputError("dose volumes must not contain NaN or infinite values")
    ref_axes = [_axis(axes_reference[a], reference.shape[a], f"reference axis {a}") for a in range(3)]
    eval_axes = [_axis(axes_evaluation[a], full.shape[a], f"evaluated axis {a}") for a in range(3)]
    distances = search_distances(criteria)
    norm = float(reference.max()) if criteria.global_normalisation is None else float(criteria.global_normalisation)
    gamma = np.full(reference.shape, np.nan)
    if norm <= 0:
        return GammaResult(gamma, criteria, 0, 0)
    above = reference >= criteria.cutoff_percent / 100 * norm
    if subset is not None:
        if np.shape(subset) != reference.shape:
            raise InputError(f"subset has shape {np.shape(subset)}, the reference {reference.shape}")
        above &= np.asarray(subset, dtype=bool)
    points = np.flatnonzero(above.ravel())
    if points.size == 0:
        return GammaResult(gamma, criteria, 0, 0)
    indices = np.unravel_index(points, reference.shape)
    mm = np.stack([ref_axes[a][0] + ref_axes[a][1] * indices[a] for a in range(3)])
    u = [(mm[a] - eval_axes[a][0]) / eval_axes[a][1] for a in range(3)]
    # The node a point starts from: the nearest one when it sits on a node (to 1e-9 of a step),
    # else the one below. Points at the same fraction past their node share the sphere's
    # stencils: the same grid gives one fraction, a grid shifted or coarser by a rational
    # factor a few (a 3 mm TPS grid on 2 mm: 8); many fractions take the slower path.
    base = [np.where(np.abs(v - np.rint(v)) < 1e-9, np.rint(v), np.floor(v)).astype(np.intp) for v in u]
    fractions = np.stack([v - b for v, b in zip(u, base, strict=True)])
    inside = np.ones(points.size, dtype=bool)
    for a in range(3):
        inside &= (base[a] >= 0) & (base[a] < full.shape[a])
    group, count = _fraction_groups(fractions)
    shared = bool(inside.all()) and count <= _MAX_FRACTIONS
    if not shared:  # each point from its nearest node (clipped into the grid: bounds there are zero)
        nearest = [np.rint(v).astype(np.intp) for v in u]
        inside = np.all([(b >= 0) & (b < n) for b, n in zip(nearest, full.shape, strict=True)], axis=0)
        base = [np.clip(b, 0, n - 1) for b, n in zip(nearest, full.shape, strict=True)]
    steps = tuple(step for _, step in eval_axes)
    # Only the points' box plus the reach is ever looked at: crop the evaluated dose to it.
    reach = [math.ceil(distances[-1] / s) + 2 for s in steps]
    lo = [max(int(b.min()) - k, 0) for b, k in zip(base, reach, strict=True)]
    hi = [min(int(b.max()) + k + 1, n) for b, k, n in zip(base, reach, full.shape, strict=True)]
    # Doses in units of the dose criterion (global: of dd x norm; local: of dd, the reference
    # dose of each point then divides the squared difference).
    unit = criteria.dose_percent / 100 * (1.0 if criteria.local else norm)
    volume = PaddedVolume(full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] / unit, pad=max(reach))
    ref_values = reference.ravel()[points]
    searching = _Points(
        position=np.arange(points.size),
        ref=ref_values / unit,
        # A local-gamma point with zero reference dose gets an infinite factor, as in pymedphys.
        factor=np.divide(1.0, ref_values**2, out=np.full(points.size, np.inf), where=ref_values != 0)
        if criteria.local
        else None,
        cell=volume.index(*(b - low for b, low in zip(base, lo, strict=True))),
        centre_inside=None if shared else inside,
        group=group if shared else None,
        mm=None if shared else mm,
    )
    axes = [np.asarray(a, dtype=np.float64) for a in axes_evaluation]
    geometry = _Geometry(
        origin=(float(axes[0][lo[0]]), float(axes[1][lo[1]]), float(axes[2][lo[2]])),
        steps=(float(steps[0]), float(steps[1]), float(steps[2])),
        edges=tuple((float(a[0]), float(a[-1])) for a in axes),
        fractions=_group_means(fractions, group, count) if shared else None,
    )
    squared = _search(volume, searching, distances, criteria, geometry)
    values = np.where(np.isinf(squared), np.nan, np.minimum(np.sqrt(squared), criteria.max_gamma))
    gamma.ravel()[points] = values
    finite = np.isfinite(values)
    return GammaResult(gamma, criteria, int(finite.sum()), int((values[finite] <= 1.0).sum()))


def _fraction_groups(fractions: np.ndarray) -> tuple[np.ndarray, int]:
    """Which of the distinct (to 1e-8 of a step) fraction triples each point sits at, and how
    many there are (per axis first: a sort of the points' triples would cost more than gamma)."""
    group = np.zeros(fractions.shape[1], dtype=np.intp)
    total = 1
    for values in fractions:
        keys = np.rint(values * 1e8).astype(np.int64)
        if keys.min() == keys.max():
            continue
        distinct, inverse = np.unique(keys, return_inverse=True)
        group = group * distinct.size + inverse.ravel()
        total *= distinct.size
        if total > _MAX_FRACTIONS * 64:
            return group, total  # far too many: the caller takes the per-position path
    used = np.flatnonzero(np.bincount(group, minlength=total))
    renumber = np.zeros(total, dtype=np.intp)
    renumber[used] = np.arange(used.size)
    return renumber[group], int(used.size)


def _group_means(fractions: np.ndarray, group: np.ndarray, count: int) -> tuple[tuple[float, float, float], ...]:
    """The mean fraction triple of each group (its members agree to 1e-8 of a step)."""
    members = np.bincount(group, minlength=count)
    means = [np.bincount(group, weights=values, minlength=count) / members for values in fractions]
    return tuple((float(means[0][g]), float(means[1][g]), float(means[2][g])) for g in range(count))


def _min_square_differences(
    volume: PaddedVolume, todo: _Points, distance: float, step: float, geometry: _Geometry, wanted: np.ndarray
) -> np.ndarray:
    """min over the sphere at `distance` of the squared scaled dose difference, per point:
    exact where below `wanted` (what could still lower the point's gamma), else at least that."""
    squared = np.empty(todo.size)
    if geometry.fractions is not None:
        assert todo.group is not None
        for group, fraction in enumerate(geometry.fractions):
            stencils = node_stencils(distance, step, fraction, geometry.steps, volume.strides)
            mine = np.flatnonzero(todo.group == group) if len(geometry.fractions) > 1 else np.arange(todo.size)
            for start in range(0, mine.size, _NODE_CHUNK):
                part = mine[start : start + _NODE_CHUNK]
                squared[part] = min_square_difference_at_nodes(
                    volume, todo.cell[part], todo.ref[part], stencils, wanted[part]
                )
        return squared
    assert todo.mm is not None
    offsets = sphere(distance, step)
    chunk = max(1, _CHUNK // offsets[0].size)
    for start in range(0, todo.size, chunk):
        span = slice(start, start + chunk)
        positions = (
            todo.mm[0, span][None, :] + offsets[0][:, None],
            todo.mm[1, span][None, :] + offsets[1][:, None],
            todo.mm[2, span][None, :] + offsets[2][:, None],
        )
        with np.errstate(over="ignore", invalid="ignore"):
            squared[span] = min_square_difference_at_positions(
                volume, geometry.origin, geometry.steps, geometry.edges, positions, todo.ref[span]
            )
    return squared


def _search(
    volume: PaddedVolume, points: _Points, distances: list[float], criteria: Criteria, geometry: _Geometry
) -> np.ndarray:
    """Gamma squared of every point (inf where no evaluated dose is within reach), uncapped."""
    result = np.full(points.size, np.inf)
    windows: WindowBounds | None = None
    reach: tuple[np.ndarray, np.ndarray] | None = None  # window bounds of the whole search
    bound_again = 0
    max_squared = criteria.max_gamma**2
    for index, distance in enumerate(distances):
        if points.size == 0:
            break
        step = _shell_step(distances, index, criteria)
        distance_term = (distance / criteria.distance_mm) ** 2
        sphere_size = sphere(distance, step)[0].size
        todo = points
        # As in 2-D: a lower bound of |D_eval - D_ref| over the window holding the sphere lets a
        # point that cannot go below min(its gamma, max_gamma) skip this sphere (exact); tried
        # where many points are at max_gamma so far, paused for a few spheres when it spares few.
        at_max = np.count_nonzero(points.squared >= max_squared)
        worth = None
        if index >= bound_again and sphere_size >= _BOUND_MIN_SPHERE and at_max * sphere_size > volume.flat.size:
            windows = windows or WindowBounds(volume)
            bound = _squared_bound(points, *windows.grow_to(*_half_widths(distance, geometry)))
            bound += distance_term
            worth = ~(bound >= np.minimum(points.squared, max_squared))  # NaN: evaluate
            spared = points.size - np.count_nonzero(worth)
            if spared < _BOUND_MIN_SPARED * points.size:
                bound_again = index + _BOUND_PAUSE
            if spared:
                todo = points.select(worth)
        if todo.size:
            # What could still lower a point's gamma: a squared difference below this (none
            # yet found: anything, which decides between max_gamma and NaN).
            wanted = np.minimum(todo.squared, max_squared) - distance_term
            if todo.factor is not None:
                wanted /= todo.factor
            wanted[np.isinf(todo.squared)] = np.inf
            squared = _min_square_differences(volume, todo, distance, step, geometry, wanted)
            if todo.factor is not None:
                squared *= todo.factor
            squared += distance_term
            if todo is points:
                np.fmin(points.squared, squared, out=points.squared)
            else:
                points.squared[worth] = np.fmin(todo.squared, squared)
        # A point is final once no later sphere can bring it below min(its gamma, max_gamma).
        if index + 1 == len(distances):
            break
        reported = np.minimum(points.squared, max_squared)
        next_term = (distances[index + 1] / criteria.distance_mm) ** 2
        final = reported <= next_term
        if reach is None and index == 0 and np.count_nonzero(reported == max_squared) * _RETIRE_GAIN > volume.flat.size:
            reach = WindowBounds(volume).grow_to(*_half_widths(distances[-1], geometry))
        if reach is not None:
            bound = _squared_bound(points, *reach)
            bound[np.isinf(points.squared)] = 0.0  # not evaluated yet: may still find a dose
            bound += next_term
            by_bound = (bound >= reported) & ~final
            if np.count_nonzero(by_bound) < _BOUND_MIN_SPARED * points.size:
                reach = None  # no longer pays: the points left can get close to their dose
            final |= by_bound
        if final.any():
            result[points.position[final]] = points.squared[final]
            points = points.select(~final)
    result[points.position] = points.squared
    return result


def _squared_bound(points: _Points, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Lower bound of the points' squared (scaled) dose difference over windows with these
    minima and maxima (zero for a point whose node is off the grid)."""
    bound = np.maximum(np.take(low, points.cell) - points.ref, points.ref - np.take(high, points.cell))
    np.maximum(bound, 0.0, out=bound)
    if points.centre_inside is not None:
        bound[~points.centre_inside] = 0.0
    np.square(bound, out=bound)
    if points.factor is not None:
        bound *= points.factor
    return bound


def _half_widths(radius_mm: float, geometry: _Geometry) -> tuple[int, ...]:
    """Half-widths (nodes) of a window around a point's node holding every node a sphere of
    this radius uses: the sphere reaches radius / step past the point, which sits less than a
    step past its node (shared fractions) or within half a step of it (nearest node)."""
    if geometry.fractions is not None:
        return tuple(math.floor(radius_mm / s + 1e-6) + 2 for s in geometry.steps)
    return tuple(math.ceil(radius_mm / s + 0.5) + 1 for s in geometry.steps)

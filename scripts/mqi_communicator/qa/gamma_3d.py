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
point reports (the search 2-D and 3-D share, qa/gamma_common.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mqi_communicator.qa.gamma import (
    Criteria,
    GammaResult,
    _checked_doses,
    _cutoff_points,
    _gamma_result,
    search_distances,
)
from mqi_communicator.qa.gamma_common import Points, Shell, search
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
    reference, full, ref_axes, eval_axes = _checked_doses(
        axes_reference, dose_reference, axes_evaluation, dose_evaluation, 3
    )
    distances = search_distances(criteria)
    norm, points = _cutoff_points(reference, criteria, subset)
    if points.size == 0:
        return GammaResult(np.full(reference.shape, np.nan), criteria, 0, 0)
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
    searching = Points.start(
        reference.ravel()[points],
        unit,
        criteria.local,
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
    squared = search(
        volume,
        searching,
        distances,
        criteria,
        lambda distance, step: _sphere_shell(volume, distance, step, criteria, geometry),
        lambda radius: _half_widths(radius, geometry),
    )
    return _gamma_result(reference.shape, points, squared, criteria)


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


def _sphere_shell(volume: PaddedVolume, distance: float, step: float, criteria: Criteria, geometry: _Geometry) -> Shell:
    """The sphere at `distance` as a shell of the shared search (qa/gamma_common.py)."""
    offsets = sphere(distance, step)
    max_squared = criteria.max_gamma**2

    def min_square_differences(todo: Points, distance_term: float) -> np.ndarray:
        # What could still lower a point's gamma: a squared difference below this (none yet
        # found: anything, which decides between max_gamma and NaN).
        wanted = np.minimum(todo.squared, max_squared) - distance_term
        if todo.factor is not None:
            wanted /= todo.factor
        wanted[np.isinf(todo.squared)] = np.inf
        return _min_square_differences(volume, todo, distance, step, offsets, geometry, wanted)

    return Shell(offsets[0].size, min_square_differences)


def _min_square_differences(
    volume: PaddedVolume,
    todo: Points,
    distance: float,
    step: float,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    geometry: _Geometry,
    wanted: np.ndarray,
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


def _half_widths(radius_mm: float, geometry: _Geometry) -> tuple[int, ...]:
    """Half-widths (nodes) of a window around a point's node holding every node a sphere of
    this radius uses: the sphere reaches radius / step past the point, which sits less than a
    step past its node (shared fractions) or within half a step of it (nearest node)."""
    if geometry.fractions is not None:
        return tuple(math.floor(radius_mm / s + 1e-6) + 2 for s in geometry.steps)
    return tuple(math.ceil(radius_mm / s + 0.5) + 1 for s in geometry.steps)

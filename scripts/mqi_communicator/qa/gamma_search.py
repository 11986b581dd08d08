"""The circle search behind `gamma.gamma_2d`: the evaluated dose, its interpolation stencils and
the exact window bound, run for all still-searching reference points at once.

Units: the evaluated and reference doses are divided by the dose criterion before the search
(global gamma: one value; local gamma: a factor per point applied to the squared difference), so
gamma squared at distance r is min |D_eval - D_ref|^2 + (r / DTA)^2. Squares are compared and
stored (sqrt is monotonic: the minimum is the same), and the root is taken once at the end.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage

# Beyond the grid the evaluated dose is this huge value, not NaN (a zero weight times NaN would
# spread it): an interpolation that gives it any weight lands above _OUTSIDE_LIMIT, so it counts
# as outside the grid, as pymedphys counts a point beyond the grid's first/last coordinate.
_OUTSIDE = 1e200
_OUTSIDE_LIMIT = 1e100
# (offsets x points) evaluated at once: bounds the temporaries to ~16 MB at any plane size.
_CHUNK = 1 << 21
# Multiply-adds in one stencil product. OpenBLAS hands a product of more than about 1e6 to
# several threads, which here costs three times the CPU for the same work (the products are
# thin) and fights whatever else the machine runs; below this it keeps to the calling thread.
_PRODUCT_LIMIT = 1 << 19
# Circles of fewer points are cheaper to evaluate than to bound; a bound that spares fewer than
# _BOUND_MIN_SPARED of the points is paused for _BOUND_PAUSE circles.
_BOUND_MIN_CIRCLE = 12
_BOUND_MIN_SPARED = 0.1
_BOUND_PAUSE = 4
# The windows of the whole search cost a few passes over the grid; each point they end early
# saves tens of circle points.
_RETIRE_GAIN = 8


def circle(distance: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (axis 0, axis 1) of the points on a circle, as pymedphys places them."""
    count = int(np.ceil(2 * np.pi * distance / step)) + 1
    theta = np.linspace(0, 2 * np.pi, count + 1)[:-1]
    return distance * np.cos(theta), distance * np.sin(theta)


@functools.lru_cache(maxsize=256)
def node_stencil(distance: float, step: float, grid0: float, grid1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bilinear interpolation of a circle around a grid node as a matrix: the node shifts
    (axis 0, axis 1) the circle touches and the weights (one row per circle point, one column per
    shift). A zero weight is left out, as pymedphys counts a point on the grid's edge as inside."""
    off0, off1 = circle(distance, step)
    d0, d1 = off0 / grid0, off1 / grid1
    f0, f1 = np.floor(d0), np.floor(d1)
    w0, w1 = d0 - f0, d1 - f1
    terms: dict[tuple[int, int], dict[int, float]] = {}
    for k in range(d0.size):
        for a, b, weight in (
            (f0[k], f1[k], (1.0 - w0[k]) * (1.0 - w1[k])),
            (f0[k], f1[k] + 1, (1.0 - w0[k]) * w1[k]),
            (f0[k] + 1, f1[k], w0[k] * (1.0 - w1[k])),
            (f0[k] + 1, f1[k] + 1, w0[k] * w1[k]),
        ):
            if weight != 0.0:
                terms.setdefault((int(a), int(b)), {})[k] = float(weight)
    shifts = sorted(terms)
    weights = np.zeros((d0.size, len(shifts)))
    for column, shift in enumerate(shifts):
        for k, weight in terms[shift].items():
            weights[k, column] = weight
    shift0 = np.array([s[0] for s in shifts], dtype=np.intp)
    shift1 = np.array([s[1] for s in shifts], dtype=np.intp)
    return shift0, shift1, weights


class SearchCriteria(Protocol):
    """What the search needs of a gamma criterion (`gamma.Criteria`)."""

    @property
    def distance_mm(self) -> float: ...
    @property
    def max_gamma(self) -> float: ...
    @property
    def interp_fraction(self) -> int: ...


class PaddedGrid:
    """A dose grid (already divided by the dose criterion) padded with _OUTSIDE on every side, flat."""

    def __init__(self, dose: np.ndarray, pad: int) -> None:
        self.n0, self.n1 = dose.shape
        self.pad = pad
        self.width = self.n1 + 2 * pad
        padded = np.full((self.n0 + 2 * pad, self.width), _OUTSIDE)
        padded[pad : pad + self.n0, pad : pad + self.n1] = dose
        self.padded = padded
        self.flat = padded.ravel()

    def index(self, i0: np.ndarray, i1: np.ndarray) -> np.ndarray:
        """Flat index of the in-grid nodes (i0, i1)."""
        return (i0 + self.pad) * self.width + (i1 + self.pad)


class Padded(Protocol):
    """A padded dose grid of any dimension (`PaddedGrid`, `gamma_3d`'s volume)."""

    @property
    def padded(self) -> np.ndarray: ...


class WindowBounds:
    """Minimum and maximum of a padded grid (2-D or 3-D) over windows of half-widths k (2 k + 1
    nodes per axis), grown step by step (a window of half-width k grown by j is one of half-width
    k + j, so each larger window costs two 1-D filters per axis of the previous one). The padding
    never is a window's minimum; it makes the maximum huge near the grid's edge, which only
    loosens the bound there."""

    def __init__(self, grid: Padded) -> None:
        self.k = (0,) * grid.padded.ndim
        self.low = grid.padded
        self.high = grid.padded

    def grow_to(self, *k: int) -> tuple[np.ndarray, np.ndarray]:
        for axis, (new, old) in enumerate(zip(k, self.k, strict=True)):
            if new > old:
                size = 2 * (new - old) + 1
                self.low = ndimage.minimum_filter1d(self.low, size, axis=axis, mode="nearest")
                self.high = ndimage.maximum_filter1d(self.high, size, axis=axis, mode="nearest")
        self.k = tuple(max(a, b) for a, b in zip(k, self.k, strict=True))
        return self.low.ravel(), self.high.ravel()


def min_square_difference_at_nodes(grid: PaddedGrid, node: np.ndarray, ref: np.ndarray, stencil: tuple) -> np.ndarray:
    """min over a circle of (D_eval - ref)^2 around the flat nodes `node`; inf where every circle
    point lies outside the grid. The stencil is the same for every point: one gather of the
    nodes it touches, one small matrix product and a minimum."""
    shift0, shift1, weights = stencil
    shifts = shift0 * grid.width + shift1
    gathered = np.take(grid.flat, node[None, :] + shifts[:, None])
    gathered -= ref  # the weights of each circle point sum to 1
    values = weights @ gathered
    with np.errstate(over="ignore"):
        np.square(values, out=values)
    best = values.min(axis=0)
    best[best > _OUTSIDE_LIMIT] = np.inf
    return best


def min_square_difference_at_positions(
    grid: PaddedGrid,
    geometry: tuple[float, float, float, float],
    edges: tuple[float, float, float, float],
    x0: np.ndarray,
    x1: np.ndarray,
    ref: np.ndarray,
) -> np.ndarray:
    """min over axis 0 of (D_eval - ref)^2 at positions (mm; circle points x reference points),
    each with its own bilinear weights; inf where every position lies outside `edges` (the whole
    evaluated grid's first and last coordinates, compared in mm exactly as pymedphys does).
    `geometry` is the grid's (origin0, step0, origin1, step1) in mm."""
    origin0, step0, origin1, step1 = geometry
    inside = (x0 >= edges[0]) & (x0 <= edges[1]) & (x1 >= edges[2]) & (x1 <= edges[3])
    u0 = (x0 - origin0) / step0
    u1 = (x1 - origin1) / step1
    i0 = np.clip(np.floor(u0), 0, grid.n0 - 2).astype(np.intp)
    i1 = np.clip(np.floor(u1), 0, grid.n1 - 2).astype(np.intp)
    w0, w1 = u0 - i0, u1 - i1
    base = grid.index(i0, i1)
    flat, width = grid.flat, grid.width
    value = (flat[base] * (1 - w0) + flat[base + width] * w0) * (1 - w1) + (
        flat[base + 1] * (1 - w0) + flat[base + width + 1] * w0
    ) * w1
    value -= ref
    np.square(value, out=value)
    value[~inside] = np.inf
    return value.min(axis=0)


@dataclass
class Points:
    """The reference points still searching, as parallel arrays (compressed as points finish):
    their index among all points, reference dose, gamma squared so far, local-gamma factor, flat
    grid index of the nearest node, and (off the grid's nodes) their positions in mm."""

    position: np.ndarray
    ref: np.ndarray
    factor: np.ndarray | None
    cell: np.ndarray
    centre_inside: np.ndarray | None
    mm0: np.ndarray | None
    mm1: np.ndarray | None
    squared: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.squared = np.full(self.position.size, np.inf)

    def select(self, keep: np.ndarray) -> Points:
        chosen = copy.copy(self)
        for name, value in vars(self).items():
            if value is not None:
                setattr(chosen, name, value[keep])
        return chosen

    @property
    def size(self) -> int:
        return int(self.position.size)


def search(
    grid: PaddedGrid,
    points: Points,
    distances: list[float],
    criteria: SearchCriteria,
    grid_steps: tuple[float, float],
    geometry: tuple[float, float, float, float],
    edges: tuple[float, float, float, float],
) -> np.ndarray:
    """Gamma squared of every point (inf where no evaluated dose is within reach), uncapped."""
    result = np.full(points.size, np.inf)
    on_nodes = points.mm0 is None
    windows: WindowBounds | None = None
    reach: tuple[np.ndarray, np.ndarray] | None = None  # window bounds of the whole search
    bound_again = 0
    max_squared = criteria.max_gamma**2
    for index, distance in enumerate(distances):
        if points.size == 0:
            break
        step = _shell_step(distances, index, criteria)
        distance_term = (distance / criteria.distance_mm) ** 2
        if on_nodes:
            stencil = node_stencil(distance, step, *grid_steps)
            circle_size = stencil[2].shape[0]
            chunk = max(1, _PRODUCT_LIMIT // stencil[2].size)
        else:
            off0, off1 = circle(distance, step)
            circle_size = off0.size
            chunk = max(1, _CHUNK // circle_size)
        todo = points
        # A lower bound of |D_eval - D_ref| over the circle, from the window that holds it: a
        # point that cannot go below min(its gamma, max_gamma) skips this circle (exact). The
        # windows cost a pass over the grid; they pay off where many points are at max_gamma so
        # far (a point that already did better is seldom beaten by a bound); a bound that spared
        # few points is not tried again for a few circles.
        at_max = np.count_nonzero(points.squared >= max_squared)
        if index >= bound_again and circle_size >= _BOUND_MIN_CIRCLE and at_max * circle_size > grid.flat.size:
            windows = windows or WindowBounds(grid)
            bound = _squared_bound(points, *windows.grow_to(*_half_widths(distance, grid_steps, on_nodes)))
            bound += distance_term
            worth = ~(bound >= np.minimum(points.squared, max_squared))  # NaN: evaluate
            spared = points.size - np.count_nonzero(worth)
            if spared < _BOUND_MIN_SPARED * points.size:
                bound_again = index + _BOUND_PAUSE
            if spared:
                todo = points.select(worth)
        if todo.size:
            squared = np.empty(todo.size)
            for start in range(0, todo.size, chunk):
                part = slice(start, start + chunk)
                if todo.mm0 is None or todo.mm1 is None:  # on the grid's nodes
                    squared[part] = min_square_difference_at_nodes(grid, todo.cell[part], todo.ref[part], stencil)
                else:
                    squared[part] = min_square_difference_at_positions(
                        grid,
                        geometry,
                        edges,
                        todo.mm0[part][None, :] + off0[:, None],
                        todo.mm1[part][None, :] + off1[:, None],
                        todo.ref[part],
                    )
            if todo.factor is not None:
                squared *= todo.factor
            squared += distance_term
            if todo is points:
                np.fmin(points.squared, squared, out=points.squared)
            else:
                points.squared[worth] = np.fmin(todo.squared, squared)
        # A point is final once no later circle can bring it below min(its gamma, max_gamma):
        # a circle at r gives at least r / DTA (and, once the windows of the whole search are
        # known, at least their bound), so gamma <= r_next / DTA ends a point's search.
        if index + 1 == len(distances):
            break
        reported = np.minimum(points.squared, max_squared)
        next_term = (distances[index + 1] / criteria.distance_mm) ** 2
        final = reported <= next_term
        if reach is None and index == 0 and np.count_nonzero(reported == max_squared) * _RETIRE_GAIN > grid.flat.size:
            reach = WindowBounds(grid).grow_to(*_half_widths(distances[-1], grid_steps, on_nodes))
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


def _squared_bound(points: Points, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Lower bound of the points' squared (scaled) dose difference over windows with these
    minima and maxima (zero for a point whose nearest node is off the grid)."""
    bound = np.maximum(np.take(low, points.cell) - points.ref, points.ref - np.take(high, points.cell))
    np.maximum(bound, 0.0, out=bound)
    if points.centre_inside is not None:
        bound[~points.centre_inside] = 0.0
    np.square(bound, out=bound)
    if points.factor is not None:
        bound *= points.factor
    return bound


def _half_widths(radius_mm: float, grid_steps: tuple[float, float], on_nodes: bool) -> tuple[int, int]:
    """Half-widths (nodes) of a window holding every node a circle of this radius uses."""
    radius0, radius1 = radius_mm / grid_steps[0], radius_mm / grid_steps[1]
    if on_nodes:
        return math.floor(radius0 + 1e-6) + 1, math.floor(radius1 + 1e-6) + 1
    return math.ceil(radius0 + 0.5) + 1, math.ceil(radius1 + 0.5) + 1


def _shell_step(distances: list[float], index: int, criteria: SearchCriteria) -> float:
    """The step size pymedphys uses to place the points of the circle at distances[index]."""
    step_min = criteria.distance_mm / criteria.interp_fraction
    if index == 0:
        return step_min
    return max(distances[index - 1] / criteria.interp_fraction / criteria.max_gamma, step_min)

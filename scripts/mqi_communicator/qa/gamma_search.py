"""The circles behind `gamma.gamma_2d`: the evaluated dose, its interpolation stencils and
the circle of each distance, for the shell search 2-D and 3-D gamma share (qa/gamma_common.py),
run for all still-searching reference points at once.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from mqi_communicator.qa.gamma_common import Points, SearchCriteria, Shell
from mqi_communicator.qa.gamma_common import search as search_shells

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


def search(
    grid: PaddedGrid,
    points: Points,
    distances: list[float],
    criteria: SearchCriteria,
    grid_steps: tuple[float, float],
    geometry: tuple[float, float, float, float],
    edges: tuple[float, float, float, float],
) -> np.ndarray:
    """Gamma squared of every point (inf where no evaluated dose is within reach), uncapped: the
    shared search (qa/gamma_common.py) over circles. Points on the grid's nodes (`points.mm`
    None) share one stencil per circle; others are interpolated at their own positions."""
    on_nodes = points.mm is None

    def shell(distance: float, step: float) -> Shell:
        if on_nodes:
            stencil = node_stencil(distance, step, *grid_steps)
            chunk = max(1, _PRODUCT_LIMIT // stencil[2].size)

            def at_nodes(todo: Points, _distance_term: float) -> np.ndarray:
                squared = np.empty(todo.size)
                for start in range(0, todo.size, chunk):
                    part = slice(start, start + chunk)
                    squared[part] = min_square_difference_at_nodes(grid, todo.cell[part], todo.ref[part], stencil)
                return squared

            return Shell(stencil[2].shape[0], at_nodes)
        off0, off1 = circle(distance, step)
        chunk = max(1, _CHUNK // off0.size)

        def at_positions(todo: Points, _distance_term: float) -> np.ndarray:
            assert todo.mm is not None
            squared = np.empty(todo.size)
            for start in range(0, todo.size, chunk):
                part = slice(start, start + chunk)
                squared[part] = min_square_difference_at_positions(
                    grid,
                    geometry,
                    edges,
                    todo.mm[0, part][None, :] + off0[:, None],
                    todo.mm[1, part][None, :] + off1[:, None],
                    todo.ref[part],
                )
            return squared

        return Shell(off0.size, at_positions)

    return search_shells(
        grid, points, distances, criteria, shell, lambda radius: _half_widths(radius, grid_steps, on_nodes)
    )


def _half_widths(radius_mm: float, grid_steps: tuple[float, float], on_nodes: bool) -> tuple[int, int]:
    """Half-widths (nodes) of a window holding every node a circle of this radius uses."""
    radius0, radius1 = radius_mm / grid_steps[0], radius_mm / grid_steps[1]
    if on_nodes:
        return math.floor(radius0 + 1e-6) + 1, math.floor(radius1 + 1e-6) + 1
    return math.ceil(radius0 + 0.5) + 1, math.ceil(radius1 + 0.5) + 1

"""The spheres behind `gamma_3d.gamma_3d`: where pymedphys places its search points in 3-D, the
trilinear interpolation of the evaluated dose there, and the padded volume it reads.

pymedphys (`calculate_coordinates_shell_3d`) puts the points of the sphere of radius r with
step s on ceil(pi r / s) + 1 rows of constant elevation phi in [0, pi] (offset r cos phi along
the third axis), each row a circle of ceil(2 pi r sin phi / s) + 1 points (r sin phi cos theta,
r sin phi sin theta) along the first two axes. Its evaluated dose there is scipy's linear
(trilinear) interpolation; a point beyond the grid's first or last coordinate counts as no dose.

Where reference points sit at the same fraction of a step past an evaluated node (the same
grid, the usual case, or one shifted, finer or coarser by a rational factor), a sphere's
interpolation weights are the same for all of them: one gather of the nodes the sphere touches,
then one small matrix per band of consecutive rows, whose nodes' minimum and maximum also bound
the band's values (so a band that cannot matter to a point is not interpolated).
"""

from __future__ import annotations

import functools

import numpy as np

from mqi_communicator.qa.gamma_search import _OUTSIDE, _OUTSIDE_LIMIT, _PRODUCT_LIMIT

# (flat node shifts, per band: (columns among the shifts, weights: band points x columns))
Stencils = tuple[np.ndarray, tuple[tuple[np.ndarray, np.ndarray], ...]]
_BAND_POINTS = 64  # a band of fewer sphere points costs more to bound than to interpolate


def sphere(distance: float, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets (axis 0, 1, 2; mm) of the sphere's points, exactly as pymedphys computes them."""
    rows = int(np.ceil(np.pi * distance / step)) + 1
    elevation = np.linspace(0, np.pi, rows)
    amount = np.ceil(2 * np.pi * (distance * np.sin(elevation)) / step).astype(int) + 1
    off0, off1, off2 = [], [], []
    for phi, count in zip(elevation, amount, strict=True):
        azimuth = np.linspace(0, 2 * np.pi, count + 1)[:-1]
        off0.append(distance * np.sin(phi) * np.cos(azimuth))
        off1.append(distance * np.sin(phi) * np.sin(azimuth))
        off2.append(distance * np.cos(phi) * np.ones_like(azimuth))
    return np.hstack(off0), np.hstack(off1), np.hstack(off2)


def sphere_rows(distance: float, step: float) -> list[np.ndarray]:
    """The indices of the sphere's points (as `sphere` orders them) row by row."""
    rows = int(np.ceil(np.pi * distance / step)) + 1
    amount = np.ceil(2 * np.pi * (distance * np.sin(np.linspace(0, np.pi, rows))) / step).astype(int) + 1
    ends = np.cumsum(amount)
    return [np.arange(end - count, end) for end, count in zip(ends, amount, strict=True)]


@functools.lru_cache(maxsize=64)  # a large sphere's matrices take a few MB
def node_stencils(
    distance: float,
    step: float,
    fraction: tuple[float, float, float],
    steps: tuple[float, float, float],
    strides: tuple[int, int, int],
) -> Stencils:
    """The trilinear interpolation of a sphere around points at `fraction` (grid units, the
    same for every point) past a node, as matrices: the flat shifts (by `strides`) of every node
    the sphere touches, and per band of consecutive rows (at least _BAND_POINTS points) the
    columns of its nodes among those shifts and its weights (one row per sphere point, one
    column per node). A zero weight is left out, as pymedphys counts a point on the grid's
    edge as inside."""
    offsets = sphere(distance, step)
    d = [fraction[a] + offsets[a] / steps[a] for a in range(3)]
    floor = [np.floor(v).astype(np.int64) for v in d]
    weight = [v - f for v, f in zip(d, floor, strict=True)]
    corners = []  # (sphere point, flat shift, weight) of every non-zero corner
    for corner in np.ndindex(2, 2, 2):
        w = np.ones(offsets[0].size)
        shift = np.zeros(offsets[0].size, dtype=np.int64)
        for a in range(3):
            w = w * (weight[a] if corner[a] else 1.0 - weight[a])
            shift += (floor[a] + corner[a]) * strides[a]
        keep = np.flatnonzero(w != 0.0)
        corners.append((keep, shift[keep], w[keep]))
    point = np.concatenate([c[0] for c in corners])
    shifts, column = np.unique(np.concatenate([c[1] for c in corners]), return_inverse=True)
    weights = np.concatenate([c[2] for c in corners])
    bands = []
    start = 0
    for rows in sphere_rows(distance, step):
        end = int(rows[-1]) + 1
        if end - start < _BAND_POINTS and end < offsets[0].size:
            continue
        mine = (point >= start) & (point < end)
        columns, local = np.unique(column[mine], return_inverse=True)
        matrix = np.zeros((end - start, columns.size))
        matrix[point[mine] - start, local] = weights[mine]  # one corner per (sphere point, node)
        bands.append((columns.astype(np.intp), matrix))
        start = end
    return shifts.astype(np.intp), tuple(bands)


class PaddedVolume:
    """A dose volume (already divided by the dose criterion) padded with _OUTSIDE on every side."""

    def __init__(self, dose: np.ndarray, pad: int) -> None:
        self.shape = dose.shape
        self.pad = pad
        padded = np.full(tuple(n + 2 * pad for n in dose.shape), _OUTSIDE)
        padded[pad : pad + dose.shape[0], pad : pad + dose.shape[1], pad : pad + dose.shape[2]] = dose
        self.padded = padded
        self.flat = padded.ravel()
        self.strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)

    def index(self, i0: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
        """Flat index of the nodes (i0, i1, i2) of the unpadded volume."""
        return (i0 + self.pad) * self.strides[0] + (i1 + self.pad) * self.strides[1] + (i2 + self.pad)


def min_square_difference_at_nodes(
    volume: PaddedVolume, node: np.ndarray, ref: np.ndarray, stencils: Stencils, wanted: np.ndarray
) -> np.ndarray:
    """min over a sphere of (D_eval - ref)^2 around the flat nodes `node` (each point at the
    stencils' fraction past its node), exact where it is below `wanted`, else possibly only
    known to be at least `wanted`; inf where every sphere point lies outside the grid.

    Band by band: an interpolated value lies between the minimum and maximum of the nodes it
    is made of, so a band whose nodes all lie `wanted` or further from `ref` (or from the best
    of the bands before) cannot matter to that point and is not interpolated (exact)."""
    shifts, bands = stencils
    every = np.take(volume.flat, node[None, :] + shifts[:, None])
    every -= ref  # the weights of each sphere point sum to 1
    best = np.full(node.size, np.inf)
    for columns, weights in bands:
        gathered = every if len(bands) == 1 else every[columns]
        bound = np.maximum(gathered.min(axis=0), -gathered.max(axis=0))
        np.maximum(bound, 0.0, out=bound)
        with np.errstate(over="ignore"):
            np.square(bound, out=bound)
        live = np.flatnonzero(bound < np.minimum(wanted, best))
        if live.size == 0:
            continue
        part = gathered if live.size == node.size else gathered[:, live]
        # Keep each product below the size at which BLAS would start threads (gamma_search.py).
        chunk = max(1, _PRODUCT_LIMIT // weights.size)
        for start in range(0, live.size, chunk):
            values = weights @ part[:, start : start + chunk]
            with np.errstate(over="ignore"):
                np.square(values, out=values)
            where = live[start : start + chunk]
            best[where] = np.minimum(best[where], values.min(axis=0))
    best[best > _OUTSIDE_LIMIT] = np.inf
    return best


def min_square_difference_at_positions(
    volume: PaddedVolume,
    origin: tuple[float, float, float],
    steps: tuple[float, float, float],
    edges: tuple[tuple[float, float], ...],
    positions: tuple[np.ndarray, np.ndarray, np.ndarray],
    ref: np.ndarray,
) -> np.ndarray:
    """min over axis 0 of (D_eval - ref)^2 at positions (mm; sphere points x reference points),
    each with its own trilinear weights; inf where every position lies outside `edges` (the
    whole evaluated grid's first and last coordinate per axis, compared in mm as pymedphys
    does). `origin` and `steps` place the (cropped) volume's first node in mm."""
    inside = np.ones(positions[0].shape, dtype=bool)
    base = np.zeros(positions[0].shape, dtype=np.intp)
    fractions = []
    for a in range(3):
        inside &= (positions[a] >= edges[a][0]) & (positions[a] <= edges[a][1])
        u = (positions[a] - origin[a]) / steps[a]
        i = np.clip(np.floor(u), 0, volume.shape[a] - 2).astype(np.intp)
        fractions.append(u - i)
        base += (i + volume.pad) * volume.strides[a]
    value = np.zeros(positions[0].shape)
    for corner in np.ndindex(2, 2, 2):
        w = np.ones(positions[0].shape)
        for a in range(3):
            w *= fractions[a] if corner[a] else 1.0 - fractions[a]
        shift = sum(c * s for c, s in zip(corner, volume.strides, strict=True))
        value += w * volume.flat[base + shift]
    value -= ref
    np.square(value, out=value)
    value[~inside] = np.inf
    return value.min(axis=0)

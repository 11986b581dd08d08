"""The shell-by-shell search that 2-D and 3-D gamma share (docs/gamma.md).

`gamma.gamma_2d` searches circles (qa/gamma_search.py), `gamma_3d.gamma_3d` spheres
(qa/gamma_sphere.py); what a shell is and how the evaluated dose is interpolated on it is
theirs. What is the same in both lives here: the reference points still searching, the order of
the shells, the two exact window bounds (one skips a shell for a point, the other ends a
point's search) and when each is worth trying, and when a point's gamma is final.

Units: the evaluated and reference doses are divided by the dose criterion before the search
(global gamma: one value; local gamma: a factor per point applied to the squared difference), so
gamma squared at distance r is min |D_eval - D_ref|^2 + (r / DTA)^2. Squares are compared and
stored (sqrt is monotonic: the minimum is the same), and the root is taken once at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage

# Shells of fewer points are cheaper to evaluate than to bound; a bound that spares fewer than
# _BOUND_MIN_SPARED of the points is paused for _BOUND_PAUSE shells.
_BOUND_MIN_SHELL = 12
_BOUND_MIN_SPARED = 0.1
_BOUND_PAUSE = 4
# The windows of the whole search cost a few passes over the grid; each point they end early
# saves tens of shell points.
_RETIRE_GAIN = 8


class SearchCriteria(Protocol):
    """What the search needs of a gamma criterion (`gamma.Criteria`)."""

    @property
    def distance_mm(self) -> float: ...
    @property
    def max_gamma(self) -> float: ...
    @property
    def interp_fraction(self) -> int: ...


class Padded(Protocol):
    """A padded dose grid of any dimension (`gamma_search.PaddedGrid`, `gamma_sphere.PaddedVolume`)."""

    @property
    def padded(self) -> np.ndarray: ...
    @property
    def flat(self) -> np.ndarray: ...


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


@dataclass
class Points:
    """The reference points still searching, as parallel arrays (compressed as points finish):
    index among all points, reference dose, gamma squared so far, local-gamma factor, flat index
    of the node they start from, whether that node is on the grid (None: all are), and either
    which of a few shared positions between nodes they sit at (3-D; None: on the nodes or off
    their paths) or (off the nodes' paths) their positions in mm, one row per axis."""

    position: np.ndarray
    ref: np.ndarray
    factor: np.ndarray | None
    cell: np.ndarray
    centre_inside: np.ndarray | None
    group: np.ndarray | None
    mm: np.ndarray | None  # (axes, points)
    squared: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.squared = np.full(self.position.size, np.inf)

    @classmethod
    def start(
        cls,
        ref_values: np.ndarray,
        unit: float,
        local: bool,
        *,
        cell: np.ndarray,
        centre_inside: np.ndarray | None,
        group: np.ndarray | None,
        mm: np.ndarray | None,
    ) -> Points:
        """All reference points, with doses `ref_values` (Gy) in units of `unit` (the dose criterion)."""
        return cls(
            position=np.arange(ref_values.size),
            ref=ref_values / unit,
            # A local-gamma point with zero reference dose gets an infinite factor, as in pymedphys.
            factor=np.divide(1.0, ref_values**2, out=np.full(ref_values.size, np.inf), where=ref_values != 0)
            if local
            else None,
            cell=cell,
            centre_inside=centre_inside,
            group=group,
            mm=mm,
        )

    def select(self, keep: np.ndarray) -> Points:
        chosen = copy.copy(self)
        for name, value in vars(self).items():
            if value is not None:  # (value[..., keep] would be the same, several times slower)
                setattr(chosen, name, value[keep] if value.ndim == 1 else value[:, keep])
        return chosen

    @property
    def size(self) -> int:
        return int(self.position.size)


@dataclass(frozen=True)
class Shell:
    """One shell of the search (a circle in 2-D, a sphere in 3-D): how many points it has, and
    min over it of the squared scaled dose difference of some points (before the local factor;
    inf where every shell point lies outside the grid), given the shell's (r / DTA)^2."""

    size: int
    min_square_differences: Callable[[Points, float], np.ndarray]


def search(
    grid: Padded,
    points: Points,
    distances: list[float],
    criteria: SearchCriteria,
    shell: Callable[[float, float], Shell],
    half_widths: Callable[[float], tuple[int, ...]],
) -> np.ndarray:
    """Gamma squared of every point (inf where no evaluated dose is within reach), uncapped.
    `shell(distance, step)` is the shell at a distance; `half_widths(radius)` those of a window
    around a point's node that holds every node a shell of this radius uses."""
    result = np.full(points.size, np.inf)
    windows: WindowBounds | None = None
    reach: tuple[np.ndarray, np.ndarray] | None = None  # window bounds of the whole search
    bound_again = 0
    max_squared = criteria.max_gamma**2
    for index, distance in enumerate(distances):
        if points.size == 0:
            break
        this = shell(distance, shell_step(distances, index, criteria))
        distance_term = (distance / criteria.distance_mm) ** 2
        todo = points
        # A lower bound of |D_eval - D_ref| over the shell, from the window that holds it: a
        # point that cannot go below min(its gamma, max_gamma) skips this shell (exact). The
        # windows cost a pass over the grid; they pay off where many points are at max_gamma so
        # far (a point that already did better is seldom beaten by a bound); a bound that spared
        # few points is not tried again for a few shells.
        at_max = np.count_nonzero(points.squared >= max_squared)
        worth = None
        if index >= bound_again and this.size >= _BOUND_MIN_SHELL and at_max * this.size > grid.flat.size:
            windows = windows or WindowBounds(grid)
            bound = squared_bound(points, *windows.grow_to(*half_widths(distance)))
            bound += distance_term
            worth = ~(bound >= np.minimum(points.squared, max_squared))  # NaN: evaluate
            spared = points.size - np.count_nonzero(worth)
            if spared < _BOUND_MIN_SPARED * points.size:
                bound_again = index + _BOUND_PAUSE
            if spared:
                todo = points.select(worth)
        if todo.size:
            squared = this.min_square_differences(todo, distance_term)
            if todo.factor is not None:
                squared *= todo.factor
            squared += distance_term
            if todo is points:
                np.fmin(points.squared, squared, out=points.squared)
            else:
                points.squared[worth] = np.fmin(todo.squared, squared)
        # A point is final once no later shell can bring it below min(its gamma, max_gamma):
        # a shell at r gives at least r / DTA (and, once the windows of the whole search are
        # known, at least their bound), so gamma <= r_next / DTA ends a point's search.
        if index + 1 == len(distances):
            break
        reported = np.minimum(points.squared, max_squared)
        next_term = (distances[index + 1] / criteria.distance_mm) ** 2
        final = reported <= next_term
        if reach is None and index == 0 and np.count_nonzero(reported == max_squared) * _RETIRE_GAIN > grid.flat.size:
            reach = WindowBounds(grid).grow_to(*half_widths(distances[-1]))
        if reach is not None:
            bound = squared_bound(points, *reach)
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


def squared_bound(points: Points, low: np.ndarray, high: np.ndarray) -> np.ndarray:
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


def shell_step(distances: list[float], index: int, criteria: SearchCriteria) -> float:
    """The step size pymedphys uses to place the points of the shell at distances[index]."""
    step_min = criteria.distance_mm / criteria.interp_fraction
    if index == 0:
        return step_min
    return max(distances[index - 1] / criteria.interp_fraction / criteria.max_gamma, step_min)

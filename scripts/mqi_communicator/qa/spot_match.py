"""Logged spots against planned spots by POSITION (docs/delivery-check.md).

A layer's log becomes visits: runs of beam-on samples (actual beam-on flag, dose > 0) split where
the beam goes off, the position jumps by more than `split_mm`, or the repaint index (flags bits
0-6) changes; a visit's position is its MU-weighted mean, its MU the sum of its samples' MU.
Visits pair with planned spots by optimal assignment on the (squared) distance matrix
(Hungarian algorithm), painting by painting; visits left over in a painting (a spot delivered in several
visits) are assigned again in further rounds, so a spot's MU is summed over all its visits and
paintings. A pair farther apart than the gate is no pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from mqi_communicator.formats import ptn

REPAINT_MASK = 0x7F  # flags bits 0-6: the painting (scan) number
SAME_POSITION_MM = 0.1  # planned spots this close are one position (their MU is summed)


@dataclass
class Visits:
    xy: np.ndarray  # (n, 2) MU-weighted mean position, plan frame (mm)
    mu: np.ndarray  # (n,)
    painting: np.ndarray  # (n,) repaint index from the flags
    first_sample: np.ndarray  # (n,) row of the visit's first sample (delivery order)


def beam_on_samples(
    rows: np.ndarray, calibration: ptn.RoomCalibration, mu_per_count: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row index, xy (n, 2) in the plan frame, MU, painting) of the beam-on samples with dose."""
    on = ((rows[:, 7] & ptn.FLAG_ACTUAL_BEAM_ON) != 0) & (rows[:, 4] > 0)
    index = np.flatnonzero(on)
    xy = np.column_stack([calibration.x_mm(rows[index, 0]), calibration.y_mm(rows[index, 1])])
    mu = rows[index, 4].astype(np.float64) * mu_per_count
    return index, xy, mu, (rows[index, 7] & REPAINT_MASK).astype(np.int64)


def logged_visits(rows: np.ndarray, calibration: ptn.RoomCalibration, mu_per_count: float, split_mm: float) -> Visits:
    """The visits of one layer's log; `mu_per_count` includes the monitor range factor."""
    index, xy, mu, painting = beam_on_samples(rows, calibration, mu_per_count)
    if index.size == 0:
        return Visits(np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    jump = np.hypot(*np.diff(xy, axis=0).T) > split_mm
    starts = np.concatenate([[0], np.flatnonzero(jump | (np.diff(index) > 1) | (np.diff(painting) != 0)) + 1])
    weights = np.add.reduceat(mu, starts)
    centre = np.add.reduceat(xy * mu[:, None], starts, axis=0) / weights[:, None]
    return Visits(centre, weights, painting[starts], index[starts])


def merged_plan(xy: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Planned spots at the same position (a spot planned twice in a layer) become one, MU summed,
    in the order of their first appearance."""
    if not len(xy):
        return xy.reshape(-1, 2), mu
    neighbours = cKDTree(xy).query_ball_point(xy, SAME_POSITION_MM)
    first = np.fromiter((min(group) for group in neighbours), dtype=np.int64, count=len(xy))
    keep, inverse = np.unique(first, return_inverse=True)
    return xy[keep].reshape(-1, 2), np.bincount(inverse, weights=mu)


def _pair_round(xy: np.ndarray, planned_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One round of pairs (visit rows, planned spots), each spot at most once: the assignment
    with the least sum of squared distances (least squares; on the plain distance the solver
    meets many ties on a regular grid and takes 10-20 times longer for the same pairs)."""
    difference = xy[:, None, :] - planned_xy[None, :, :]
    return linear_sum_assignment(np.einsum("ijk,ijk->ij", difference, difference))


def assign(visits: Visits, planned_xy: np.ndarray, gate_mm: float) -> np.ndarray:
    """Planned spot index per visit (-1: unmatched), by optimal assignment per painting."""
    assignment = np.full(len(visits.mu), -1)
    if not len(planned_xy):
        return assignment
    for painting in np.unique(visits.painting):
        pending = np.flatnonzero(visits.painting == painting)
        while pending.size:
            rows, cols = _pair_round(visits.xy[pending], planned_xy)
            inside = np.linalg.norm(visits.xy[pending[rows]] - planned_xy[cols], axis=1) <= gate_mm
            if not inside.any():
                break
            assignment[pending[rows[inside]]] = cols[inside]
            # Visits beyond the gate stay unmatched; visits left over (more than the planned
            # spots) go to the next round: further visits of the same spots.
            pending = np.delete(pending, rows)
    return assignment


def _axis_stats(diff: np.ndarray) -> dict[str, float]:
    if diff.size == 0:
        return {"mean": 0.0, "sd": 0.0, "max": 0.0}
    return {"mean": float(diff.mean()), "sd": float(diff.std()), "max": float(np.abs(diff).max())}


def position_stats(dx: np.ndarray, dy: np.ndarray) -> dict[str, float]:
    """Per-axis mean / SD / max |difference| (mm), and the worse axis of each (the clinic's
    checker limits each axis separately)."""
    sx, sy = _axis_stats(dx), _axis_stats(dy)
    return {
        "position_mean_x_mm": sx["mean"],
        "position_mean_y_mm": sy["mean"],
        "position_sd_x_mm": sx["sd"],
        "position_sd_y_mm": sy["sd"],
        "position_max_x_mm": sx["max"],
        "position_max_y_mm": sy["max"],
        "position_mean_mm": max(abs(sx["mean"]), abs(sy["mean"])),
        "position_sd_mm": max(sx["sd"], sy["sd"]),
        "position_max_mm": max(sx["max"], sy["max"]),
    }


def mu_comparison(logged: np.ndarray, planned: np.ndarray, tol: dict[str, Any]) -> dict[str, Any]:
    """Per planned element: logged against planned MU; within spot_mu_percent OR the floor."""
    diff = logged - planned
    percent = np.divide(100.0 * diff, planned, out=np.zeros_like(diff), where=planned > 0)
    outside = (np.abs(percent) > tol["spot_mu_percent"]) & (np.abs(diff) > tol["spot_mu_floor_mu"])
    worst = int(np.argmax(np.abs(percent))) if percent.size else -1
    worst_out = int(np.flatnonzero(outside)[np.argmax(np.abs(percent[outside]))]) if outside.any() else -1
    return {
        "spot_mu_max_diff_percent": float(percent[worst]) if worst >= 0 else 0.0,
        "spot_mu_max_diff_mu": float(np.abs(diff).max()) if diff.size else 0.0,
        "spots_mu_outside": int(outside.sum()),
        "_worst_outside": worst_out,
        "_percent": percent,
        "_diff": diff,
    }


def order_as_planned(assignment: np.ndarray, visits: Visits) -> bool:
    """Whether the matched visits, painting by painting in delivery order, reach the planned
    spots in plan order."""
    for painting in np.unique(visits.painting):
        chosen = (visits.painting == painting) & (assignment >= 0)
        sequence = assignment[chosen][np.argsort(visits.first_sample[chosen], kind="stable")]
        if np.any(np.diff(sequence) < 0):
            return False
    return True


def match_spots(visits: Visits, planned_xy: np.ndarray, planned_mu: np.ndarray, tol: dict[str, Any]) -> dict[str, Any]:
    """Pairing, per-axis position statistics and MU per planned spot of one layer."""
    assignment = assign(visits, planned_xy, float(tol["match_gate_mm"]))
    matched = assignment >= 0
    count = len(planned_xy)
    logged_mu = np.bincount(assignment[matched], weights=visits.mu[matched], minlength=count)
    visited = logged_mu > 0
    # A spot's delivered position: the MU-weighted mean over its visits (all paintings).
    centre = np.zeros((count, 2))
    np.add.at(centre, assignment[matched], visits.xy[matched] * visits.mu[matched, None])
    centre[visited] /= logged_mu[visited, None]
    diff = centre[visited] - planned_xy[visited]
    unmatched_mu = float(visits.mu[~matched].sum())
    result: dict[str, Any] = {
        "method": "spots",
        "pairing": {
            "visits_logged": len(visits.mu),
            "paintings": int(np.unique(visits.painting).size),
            "spots_matched": int(visited.sum()),
            "visits_unmatched": int((~matched).sum()),
            "unmatched_logged_mu": unmatched_mu,
            "planned_spots_not_delivered": int((~visited).sum()),
            "order_as_planned": order_as_planned(assignment, visits),
        },
        **position_stats(diff[:, 0], diff[:, 1]),
        **mu_comparison(logged_mu, planned_mu, tol),
    }
    result["_logged_mu"] = logged_mu
    result["_not_delivered"] = np.flatnonzero(~visited)
    return result

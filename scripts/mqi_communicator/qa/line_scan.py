"""LINE scanning (PS3.3 C.8.8.25 ScanMode LINE): the log's beam-on path against the planned
line segments (docs/delivery-check.md).

The beam moves along each planned segment while it delivers the segment's MU, so samples are
not spots: each beam-on sample is compared with the nearest point of the planned path (its
x and y offsets from it), and the MU logged nearest each segment with that segment's MU. A
LINE layer whose segments are all shorter than `line_point_mm` is a list of spots (the SHI
way to plan spot scanning as lines of zero length) and is checked as spots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mqi_communicator.qa.spot_match import mu_comparison, position_stats

CHUNK_SAMPLES = 4096  # samples x segments distance blocks, to bound memory


def is_point_layer(segments: np.ndarray, point_mm: float) -> bool:
    return bool(np.all(np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1]) < point_mm))


def nearest_on_path(xy: np.ndarray, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment index, offset sample - nearest path point (n, 2)) for every sample."""
    start, end = segments[:, 0:2], segments[:, 2:4]
    along = end - start
    length2 = np.einsum("ij,ij->i", along, along)
    index = np.empty(len(xy), dtype=np.int64)
    offset = np.empty((len(xy), 2))
    for lo in range(0, len(xy), CHUNK_SAMPLES):
        p = xy[lo : lo + CHUNK_SAMPLES, None, :]
        t = np.einsum("nkj,kj->nk", p - start[None], along)
        t = np.clip(np.divide(t, length2, out=np.zeros_like(t), where=length2 > 0), 0.0, 1.0)
        d = p - (start[None] + t[..., None] * along[None])
        best = np.argmin(np.einsum("nkj,nkj->nk", d, d), axis=1)
        index[lo : lo + len(best)] = best
        offset[lo : lo + len(best)] = d[np.arange(len(best)), best]
    return index, offset


def match_path(xy: np.ndarray, mu: np.ndarray, segments: np.ndarray, tol: dict[str, Any]) -> dict[str, Any]:
    """Per-axis offsets of the beam-on samples from the planned path (MU-weighted mean and SD,
    largest |offset|) and MU per segment."""
    planned_mu = segments[:, 4]
    if len(xy) == 0:
        index, offset = np.zeros(0, np.int64), np.zeros((0, 2))
    else:
        index, offset = nearest_on_path(xy, segments)
    gate = float(tol["match_gate_mm"])
    near = np.hypot(offset[:, 0], offset[:, 1]) <= gate
    logged_mu = np.bincount(index[near], weights=mu[near], minlength=len(segments))
    stats = position_stats(offset[:, 0], offset[:, 1])
    if mu.sum() > 0:
        # Mean and SD weighted by MU: the dose-relevant offset, not the time spent moving.
        for axis, k in (("x", 0), ("y", 1)):
            mean = float(np.average(offset[:, k], weights=mu))
            sd = float(np.sqrt(np.average((offset[:, k] - mean) ** 2, weights=mu)))
            stats[f"position_mean_{axis}_mm"], stats[f"position_sd_{axis}_mm"] = mean, sd
        stats["position_mean_mm"] = max(abs(stats["position_mean_x_mm"]), abs(stats["position_mean_y_mm"]))
        stats["position_sd_mm"] = max(stats["position_sd_x_mm"], stats["position_sd_y_mm"])
    result: dict[str, Any] = {
        "method": "line path",
        "pairing": {
            "samples_logged": len(mu),
            "segments_planned": len(segments),
            "segments_reached": int((logged_mu > 0).sum()),
            "unmatched_logged_mu": float(mu[~near].sum()),
            "planned_spots_not_delivered": int((logged_mu <= 0).sum()),
        },
        **stats,
        **mu_comparison(logged_mu, planned_mu, tol),
    }
    result["_logged_mu"] = logged_mu
    result["_not_delivered"] = np.flatnonzero(logged_mu <= 0)
    return result

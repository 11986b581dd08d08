"""Delivery check, independent of any dose engine: each layer's PTN log against the plan.

Spots in the log: the beam-on samples (actual beam-on flag), split into spots where the beam
goes off or where the position jumps by more than `spot_split_mm` between samples. A spot's
position is its MU-weighted mean position, its MU the sum of its samples' dose1 counts x the
room's MU per count x the layer's monitor range factor. Logged spots pair with planned spots
in delivery order (the plan's spot order); a different count is reported and the spots are
then paired by nearest planned position. Per layer: spot position differences (radial: mean,
SD, max against 1 / 1.5 / 3 mm, as the clinic's log checker), MU per spot (largest relative
difference) and per layer (relative difference); a layer beyond any tolerance is flagged and
named, and the beam's delivery verdict is FAIL when any layer is flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import ptn
from ..plan import Beam, Layer


def logged_spots(
    rows: np.ndarray, calibration: ptn.RoomCalibration, range_factor: float, split_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """(positions (n, 2) in mm, MU (n,)) of the spots in one layer's log rows."""
    on = (rows[:, 7] & ptn.FLAG_ACTUAL_BEAM_ON) != 0
    x, y = calibration.x_mm(rows[:, 0]), calibration.y_mm(rows[:, 1])
    mu = rows[:, 4].astype(np.float64) * calibration.mu_per_dose1_count * range_factor
    index = np.flatnonzero(on)
    if index.size == 0:
        return np.zeros((0, 2)), np.zeros(0)
    jump = np.hypot(np.diff(x[index]), np.diff(y[index])) > split_mm
    gap = np.diff(index) > 1
    starts = np.concatenate([[0], np.flatnonzero(jump | gap) + 1])
    weights = np.add.reduceat(mu[index], starts)
    safe = np.where(weights > 0, weights, 1.0)
    sx = np.add.reduceat(x[index] * mu[index], starts) / safe
    sy = np.add.reduceat(y[index] * mu[index], starts) / safe
    keep = weights > 0
    return np.column_stack([sx, sy])[keep], weights[keep]


def check_layer(layer: Layer, positions: np.ndarray, mu: np.ndarray, tol: dict[str, Any]) -> dict[str, Any]:
    planned = np.asarray(layer.spot_xy_mm, dtype=np.float64).reshape(-1, 2)
    planned_mu = np.asarray(layer.spot_mu, dtype=np.float64)
    keep = planned_mu > 0
    planned, planned_mu = planned[keep], planned_mu[keep]
    notes = []
    if len(positions) == len(planned):
        order = np.arange(len(planned))
    else:
        notes.append(f"{len(positions)} spots logged for {len(planned)} planned; paired by nearest position")
        order = np.argmin(np.linalg.norm(positions[:, None, :] - planned[None, :, :], axis=2), axis=1)
    diff = np.linalg.norm(positions - planned[order], axis=1) if len(positions) else np.zeros(0)
    spot_mu_diff = 100.0 * (mu - planned_mu[order]) / planned_mu[order] if len(mu) else np.zeros(0)
    layer_mu = float(mu.sum())
    layer_mu_diff = (
        100.0 * (layer_mu - float(planned_mu.sum())) / float(planned_mu.sum()) if planned_mu.sum() > 0 else 0.0
    )
    result: dict[str, Any] = {
        "energy_mev": layer.energy_mev,
        "spots_planned": len(planned),
        "spots_logged": len(positions),
        "position_mean_mm": float(diff.mean()) if diff.size else 0.0,
        "position_sd_mm": float(diff.std()) if diff.size else 0.0,
        "position_max_mm": float(diff.max()) if diff.size else 0.0,
        "spot_mu_max_diff_percent": float(spot_mu_diff[np.argmax(np.abs(spot_mu_diff))]) if spot_mu_diff.size else 0.0,
        "layer_mu_planned": float(planned_mu.sum()),
        "layer_mu_logged": layer_mu,
        "layer_mu_diff_percent": layer_mu_diff,
        "notes": notes,
    }
    flags = []
    for key, limit in (
        ("position_mean_mm", "position_mean_mm"),
        ("position_sd_mm", "position_sd_mm"),
        ("position_max_mm", "position_max_mm"),
    ):
        if result[key] > tol[limit]:
            flags.append(f"{key.replace('_mm', '')} {result[key]:.2f} mm > {tol[limit]:g} mm")
    if abs(result["spot_mu_max_diff_percent"]) > tol["spot_mu_percent"]:
        flags.append(f"spot MU off by {result['spot_mu_max_diff_percent']:+.1f} % (> {tol['spot_mu_percent']:g} %)")
    if abs(layer_mu_diff) > tol["layer_mu_percent"]:
        flags.append(f"layer MU off by {layer_mu_diff:+.2f} % (> {tol['layer_mu_percent']:g} %)")
    if len(positions) != len(planned):
        flags.append(f"{len(positions)} spots logged, {len(planned)} planned")
    result["flags"] = flags
    return result


def check_beam(
    beam: Beam,
    deliveries: list[dict[str, Any]],
    case_dir: Path,
    calibration: ptn.RoomCalibration,
    range_factors: list[float],
    tol: dict[str, Any],
) -> dict[str, Any]:
    """The delivery check of one beam from its simulated deliveries (intake manifest entries)."""
    layers = []
    for delivery in deliveries:
        folder = case_dir / delivery["folder"]
        codes = delivery["dose1_range_codes"]
        for offset, entry in enumerate(delivery["ptn"]):
            number = delivery["start_layer"] + offset
            layer = beam.layers[number - 1]
            positions, mu = logged_spots(
                ptn.read_ptn(folder / entry["file"]),
                calibration,
                range_factors[codes[offset] - 1],
                tol["spot_split_mm"],
            )
            layers.append(
                {"layer": number, "ptn": f"{delivery['folder']}/{entry['file']}"}
                | check_layer(layer, positions, mu, tol)
            )
    delivered = {entry["layer"] for entry in layers}
    missing = [k for k in range(1, len(beam.layers) + 1) if k not in delivered]
    flagged = [entry["layer"] for entry in layers if entry["flags"]]
    reasons = [
        f"layer {entry['layer']} ({entry['energy_mev']:g} MeV): " + "; ".join(entry["flags"])
        for entry in layers
        if entry["flags"]
    ]
    if missing:
        reasons.append(f"layers {missing} not delivered")
    if not layers:
        verdict, reasons = "NOT APPLICABLE", ["no delivery log (plan-based case): nothing to check"]
    else:
        verdict = "FAIL" if flagged or missing else "PASS"
    return {"verdict": verdict, "reasons": reasons, "flagged_layers": flagged, "layers": layers}

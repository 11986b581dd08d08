"""Delivery check, independent of any dose engine: each layer's PTN log against the plan
(docs/delivery-check.md).

The log is read in the plan's frame with the room's calibration (x sign, MU per count at the
layer's energy x the layer's monitor range factor; docs/log-plan-frame.md). Spot-scanned layers
(ScanMode MODULATED, or LINE with zero-length lines) pair logged spots with planned spots by
position (qa/spot_match.py): delivery order, repainting and spots delivered in several visits do
not matter; each planned spot's MU is summed over its visits. True LINE layers compare the
beam-on path with the planned segments (qa/line_scan.py). Per layer: position differences per
axis (mean, SD, max |d| of x and of y, each against 1 / 1.5 / 3 mm, as the clinic's ptn_checker),
MU per spot (within spot_mu_percent OR the absolute floor spot_mu_floor_mu) and per layer; a
layer beyond any limit is flagged and named, and the beam's delivery verdict is FAIL when any
layer is flagged. Scan modes without spots (UNIFORM, NONE) are NOT ASSESSED, by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mqi_communicator.formats import ptn
from mqi_communicator.formats.plan import Beam, Layer
from mqi_communicator.qa import line_scan, spot_match

SPOT_SCAN_MODES = ("MODULATED", "MODULATED_SPEC")


@dataclass(frozen=True)
class RoomCheck:
    """What the delivery check of one room's logs takes from the config: the room's calibration
    (`rooms.<room>`), the monitor range factors and the tolerances (`qa.delivery`)."""

    calibration: ptn.RoomCalibration
    range_factors: list[float]
    tol: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any], room: str) -> RoomCheck:
        return cls(
            ptn.RoomCalibration.from_config(config["rooms"][room]),
            config["monitor_range_factors"],
            config["qa"]["delivery"],
        )


def _planned_spots(layer: Layer, scan_mode: str, tol: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Planned (positions, MU) when the layer is spot-scanned; None for a true LINE layer."""
    if scan_mode == "LINE" and layer.line_segments:
        segments = np.asarray(layer.line_segments, dtype=np.float64)
        if not line_scan.is_point_layer(segments, float(tol["line_point_mm"])):
            return None
        return spot_match.merged_plan(segments[:, 2:4], segments[:, 4])
    xy = np.asarray(layer.spot_xy_mm, dtype=np.float64).reshape(-1, 2)
    mu = np.asarray(layer.spot_mu, dtype=np.float64)
    return spot_match.merged_plan(xy[mu > 0], mu[mu > 0])


def _position_flags(result: dict[str, Any], tol: dict[str, Any]) -> list[str]:
    flags = []
    for stat, limit in (("mean", "position_mean_mm"), ("sd", "position_sd_mm"), ("max", "position_max_mm")):
        for axis in ("x", "y"):
            value = result[f"position_{stat}_{axis}_mm"]
            if abs(value) > tol[limit]:
                flags.append(f"position {stat} {axis} {value:+.2f} mm (limit {tol[limit]:g} mm per axis)")
    return flags


def _pairs_badly(result: dict[str, Any], tol: dict[str, Any]) -> bool:
    return bool(_position_flags(result, tol)) or result["pairing"]["planned_spots_not_delivered"] > 0


def check_layer(
    layer: Layer,
    rows: np.ndarray,
    calibration: ptn.RoomCalibration,
    mu_per_count: float,
    tol: dict[str, Any],
    scan_mode: str = "MODULATED",
) -> dict[str, Any]:
    """One layer's log against its plan layer; `mu_per_count` includes the monitor range factor."""
    planned = _planned_spots(layer, scan_mode, tol)
    notes: list[str] = []
    if planned is None:
        segments = np.asarray(layer.line_segments, dtype=np.float64)
        _, xy, mu, _ = spot_match.beam_on_samples(rows, calibration, mu_per_count)
        result = line_scan.match_path(xy, mu, segments, tol)
        planned_mu = segments[:, 4]
    else:
        planned_xy, planned_mu = planned
        visits = spot_match.logged_visits(rows, calibration, mu_per_count, float(tol["spot_split_mm"]))
        result = spot_match.match_spots(visits, planned_xy, planned_mu, tol)
        if not result["pairing"]["order_as_planned"]:
            notes.append("spots were delivered in another order than planned (matched by position)")
        if result["pairing"]["paintings"] > 1:
            notes.append(f"{result['pairing']['paintings']} paintings: each spot's MU summed over them")
        # A wrong x_sign shows as a layer that pairs badly but would pair well mirrored.
        mirrored = spot_match.Visits(visits.xy * [-1.0, 1.0], visits.mu, visits.painting, visits.first_sample)
        if _pairs_badly(result, tol) and not _pairs_badly(
            spot_match.match_spots(mirrored, planned_xy, planned_mu, tol), tol
        ):
            notes.append("the log matches the plan with x mirrored: check the room's x_sign (docs/log-plan-frame.md)")
    logged_mu, not_delivered = result.pop("_logged_mu"), result.pop("_not_delivered")
    percent, diff, worst = result.pop("_percent"), result.pop("_diff"), result.pop("_worst_outside")
    layer_planned, layer_logged = (
        float(planned_mu.sum()),
        float(logged_mu.sum() + result["pairing"]["unmatched_logged_mu"]),
    )
    layer_mu_diff = 100.0 * (layer_logged - layer_planned) / layer_planned if layer_planned > 0 else 0.0
    result |= {
        "energy_mev": layer.energy_mev,
        "spots_planned": len(planned_mu),
        "spots_logged": int(result["pairing"].get("visits_logged", result["pairing"].get("samples_logged", 0))),
        "layer_mu_planned": layer_planned,
        "layer_mu_logged": layer_logged,
        "layer_mu_diff_percent": layer_mu_diff,
        "notes": notes,
    }
    flags = _position_flags(result, tol)
    if worst >= 0:
        flags.append(
            f"{result['spots_mu_outside']} spot(s) off in MU, worst {percent[worst]:+.1f} % ({diff[worst]:+.4g} MU; "
            f"limit {tol['spot_mu_percent']:g} % or {tol['spot_mu_floor_mu']:g} MU)"
        )
    if abs(layer_mu_diff) > tol["layer_mu_percent"]:
        flags.append(f"layer MU off by {layer_mu_diff:+.2f} % (> {tol['layer_mu_percent']:g} %)")
    missing_mu = float(planned_mu[not_delivered].sum())
    if missing_mu > tol["spot_mu_floor_mu"]:
        flags.append(f"{len(not_delivered)} planned spot(s) not delivered ({missing_mu:.4g} MU)")
    if result["pairing"]["unmatched_logged_mu"] > tol["spot_mu_floor_mu"]:
        flags.append(
            f"{result['pairing']['unmatched_logged_mu']:.4g} MU logged farther than "
            f"{tol['match_gate_mm']:g} mm from every planned spot"
        )
    result["flags"] = flags
    return result


def check_beam(beam: Beam, deliveries: list[dict[str, Any]], case_dir: Path, room: RoomCheck) -> dict[str, Any]:
    """The delivery check of one beam from its simulated deliveries (intake manifest entries)."""
    calibration, range_factors, tol = room.calibration, room.range_factors, room.tol
    if deliveries and beam.scan_mode not in (*SPOT_SCAN_MODES, "LINE"):
        return {
            "verdict": "NOT ASSESSED",
            "reasons": [f"scan mode {beam.scan_mode}: the delivery check knows spot and LINE scanning only"],
            "flagged_layers": [],
            "layers": [],
        }
    if deliveries and not beam.mu_known:
        return {
            "verdict": "NOT ASSESSED",
            "reasons": ["the plan gives no BeamMeterset for this beam: its planned MU are unknown"],
            "flagged_layers": [],
            "layers": [],
        }
    layers = []
    for delivery in deliveries:
        folder = case_dir / delivery["folder"]
        codes = delivery["dose1_range_codes"]
        for offset, entry in enumerate(delivery["ptn"]):
            number = delivery["start_layer"] + offset
            layer = beam.layers[number - 1]
            mu_per_count = calibration.mu_per_count(layer.energy_mev) * range_factors[codes[offset] - 1]
            rows = ptn.read_ptn(folder / entry["file"])
            layers.append(
                {"layer": number, "ptn": f"{delivery['folder']}/{entry['file']}"}
                | check_layer(layer, rows, calibration, mu_per_count, tol, beam.scan_mode)
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

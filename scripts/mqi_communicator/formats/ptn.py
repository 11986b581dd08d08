"""Sumitomo PTN delivery logs: rows of 8 big-endian uint16, converted with a room's calibration.

Columns: x, y, x-size, y-size, dose1, dose2, layer, flags (bit 15 planned beam-on, bit 14
actual beam-on, bits 0-6 repaint). Row i was sampled at i x TIMEGAIN ms.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mqi_communicator import cli
from mqi_communicator.errors import InputError

ROW_BYTES = 16
COLUMNS = ("x", "y", "x_size", "y_size", "dose1", "dose2", "layer", "flags")
FLAG_PLANNED_BEAM_ON = 1 << 15
FLAG_ACTUAL_BEAM_ON = 1 << 14
# The layer number is the last run of digits before `.ptn` (`<irradiation time>_<layer>.ptn`).
LAYER_NUMBER_PATTERN = re.compile(r"(\d+)\.ptn$", re.IGNORECASE)


@dataclass(frozen=True)
class RoomCalibration:
    """A room's `scv_init` values (docs/design.md#ptn-log) and how the log's frame relates to the plan's;
    data from config, never hard-coded in rules. See docs/log-plan-frame.md for the evidence
    behind `x_sign` and the energy dependence of the MU per count."""

    timegain_ms: float
    x_offset: float
    y_offset: float
    x_gain_mm: float
    y_gain_mm: float
    mu_per_dose1_count: float  # at the table's reference energy (factor 1, 70 MeV)
    # +1 or -1: the PTN x axis against the plan's IEC gantry X (G2's log is mirrored in x).
    x_sign: float = 1.0
    # MU per count rises with energy (the monitor's charge per proton falls like the stopping
    # power): mu_per_dose1_count x factor(E), interpolated linearly; empty = no dependence.
    mu_factor_energies_mev: tuple[float, ...] = ()
    mu_factor_values: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> RoomCalibration:
        table = section.get("mu_per_count_energy_factor") or {}
        energies = tuple(float(e) for e in table.get("energies_mev", ()))
        factors = tuple(float(f) for f in table.get("factors", ()))
        if len(energies) != len(factors) or list(energies) != sorted(energies):
            raise InputError(
                "mu_per_count_energy_factor needs as many factors as energies_mev, energies ascending "
                f"(got {len(energies)} energies, {len(factors)} factors)"
            )
        return cls(
            timegain_ms=float(section["timegain_ms"]),
            x_offset=float(section["x_offset"]),
            y_offset=float(section["y_offset"]),
            x_gain_mm=float(section["x_gain_mm"]),
            y_gain_mm=float(section["y_gain_mm"]),
            mu_per_dose1_count=float(section["mu_per_dose1_count"]),
            x_sign=float(section.get("x_sign", 1)),
            mu_factor_energies_mev=energies,
            mu_factor_values=factors,
        )

    def x_mm(self, raw: np.ndarray) -> np.ndarray:
        """x in the plan's frame (IEC gantry X at the isocentre)."""
        return (np.asarray(raw, dtype=np.float64) - self.x_offset) * (self.x_gain_mm * self.x_sign)

    def y_mm(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=np.float64) - self.y_offset) * self.y_gain_mm

    def raw_x(self, x_mm: np.ndarray) -> np.ndarray:
        """The raw value the machine logs for plan-frame x (inverse of `x_mm`, not rounded)."""
        return np.asarray(x_mm, dtype=np.float64) / (self.x_gain_mm * self.x_sign) + self.x_offset

    def raw_y(self, y_mm: np.ndarray) -> np.ndarray:
        return np.asarray(y_mm, dtype=np.float64) / self.y_gain_mm + self.y_offset

    def mu_per_count(self, energy_mev: float) -> float:
        """MU per dose1 count (at monitor range factor 1) for a layer of this energy."""
        if not self.mu_factor_energies_mev:
            return self.mu_per_dose1_count
        factor = np.interp(energy_mev, self.mu_factor_energies_mev, self.mu_factor_values)
        return self.mu_per_dose1_count * float(factor)


def layer_number(path: Path) -> int:
    """The layer number in a PTN file's name, whatever its zero padding (`_7`, `_007`, `_120`)."""
    match = LAYER_NUMBER_PATTERN.search(path.name)
    if match is None:
        raise InputError(f"{path}: no layer number in the file name (expected <name>_<layer>.ptn)")
    return int(match.group(1))


def layer_problems(
    log: np.ndarray,
    calibration: RoomCalibration,
    range_factor: float,
    planned_mu: float,
    planned_spots_mm: Sequence[tuple[float, float]],
    checks: dict[str, Any],
    *,
    energy_mev: float,
) -> list[str]:
    """What makes one layer's log implausible against the plan (empty when it is plausible).

    Beam-on samples (flag bit 14) that carry dose must lie inside the scanning field and, all but
    a small share of the layer's MU, near a planned spot; the MU the monitor counted (dose1 x
    monitor range factor x MU per count at the layer's energy) must match the layer's planned MU
    within a tolerance."""
    if len(log) == 0:
        return ["the log is empty (0 samples)"]
    if np.all(log == 0xFFFF):
        return [f"every one of its {len(log)} samples is 0xFFFF (no data recorded)"]
    problems: list[str] = []
    dose1 = log[:, 4].astype(np.float64)
    delivered_mu = float(dose1.sum()) * range_factor * calibration.mu_per_count(energy_mev)
    tolerance = float(checks["mu_tolerance"])
    if planned_mu > 0 and abs(delivered_mu - planned_mu) > tolerance * planned_mu:
        problems.append(
            f"delivered {delivered_mu:.4g} MU against {planned_mu:.4g} MU planned "
            f"({100 * (delivered_mu / planned_mu - 1):+.1f} %, tolerance {100 * tolerance:g} %)"
        )
    on = ((log[:, 7] & FLAG_ACTUAL_BEAM_ON) != 0) & (log[:, 4] > 0)
    if not on.any():
        if planned_mu > 0:
            problems.append("no beam-on sample carries dose")
        return problems
    x = calibration.x_mm(log[on, 0])
    y = calibration.y_mm(log[on, 1])
    weight = dose1[on]
    half = float(checks["scan_field_half_mm"])
    outside = (np.abs(x) > half) | (np.abs(y) > half)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        problems.append(
            f"{int(outside.sum())} beam-on samples lie outside the scanning field (|x|, |y| <= {half:g} mm), "
            f"e.g. at ({x[first]:.1f}, {y[first]:.1f}) mm"
        )
    if len(planned_spots_mm):
        # Imported here: scipy's import is ~0.3 s of start-up that P2, which never checks logs, need not pay.
        from scipy.spatial import cKDTree

        distance, _ = cKDTree(np.asarray(planned_spots_mm, dtype=np.float64)).query(np.column_stack([x, y]))
        far = distance > float(checks["spot_distance_mm"])
        share = float(weight[far].sum() / weight.sum())
        if share > float(checks["max_off_spot_fraction"]):
            problems.append(
                f"{100 * share:.1f} % of its beam-on dose lies more than {checks['spot_distance_mm']:g} mm "
                f"from every planned spot (at most {100 * float(checks['max_off_spot_fraction']):g} % allowed)"
            )
    return problems


def check_size(path: Path) -> int:
    """Number of rows; raises ValueError naming the file when the size is not whole rows."""
    size = path.stat().st_size
    if size % ROW_BYTES:
        raise InputError(f"{path}: size {size} bytes is not a multiple of {ROW_BYTES} (8 big-endian uint16 per row)")
    return size // ROW_BYTES


def rows_of(data: bytes, path: Path) -> np.ndarray:
    """A PTN file's bytes as an (N, 8) big-endian uint16 view (no copy); `path` names the file
    in the error when the size is not whole rows."""
    if len(data) % ROW_BYTES:
        raise InputError(
            f"{path}: size {len(data)} bytes is not a multiple of {ROW_BYTES} (8 big-endian uint16 per row)"
        )
    return np.frombuffer(data, dtype=">u2").reshape(-1, 8)


def read_ptn(path: Path) -> np.ndarray:
    """The log as an (N, 8) uint16 array in native byte order."""
    check_size(path)
    return np.fromfile(path, dtype=">u2").reshape(-1, 8).astype(np.uint16)


def write_ptn(path: Path, rows: np.ndarray) -> None:
    """Write (N, 8) integer rows as a PTN file (used by the synthetic case generator)."""
    data = np.asarray(rows)
    if data.ndim != 2 or data.shape[1] != 8:
        raise InputError(f"PTN rows must be (N, 8), got {data.shape}")
    if data.min(initial=0) < 0 or data.max(initial=0) > 0xFFFF:
        raise InputError("PTN values must fit in uint16")
    path.write_bytes(data.astype(">u2").tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.formats.ptn", description="Print a PTN log's rows (raw values) and a summary."
    )
    parser.add_argument("ptn", type=Path)
    parser.add_argument("--head", type=int, default=5, help="rows to print")
    return cli.run(parser, _show, argv, step="formats.ptn", label="PTN")


def _show(args: argparse.Namespace) -> int:
    rows = read_ptn(args.ptn)
    beam_on = (rows[:, 7] & FLAG_ACTUAL_BEAM_ON) != 0
    print(" ".join(COLUMNS))
    for row in rows[: args.head]:
        print(" ".join(str(int(v)) for v in row))
    print(f"rows={len(rows)} beam_on_rows={int(beam_on.sum())} dose1_sum={int(rows[:, 4].astype(np.int64).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

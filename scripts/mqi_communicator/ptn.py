"""Sumitomo PTN delivery logs: rows of 8 big-endian uint16, converted with a room's calibration.

Columns: x, y, x-size, y-size, dose1, dose2, layer, flags (bit 15 planned beam-on, bit 14
actual beam-on, bits 0-6 repaint). Row i was sampled at i x TIMEGAIN ms.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROW_BYTES = 16
COLUMNS = ("x", "y", "x_size", "y_size", "dose1", "dose2", "layer", "flags")
FLAG_PLANNED_BEAM_ON = 1 << 15
FLAG_ACTUAL_BEAM_ON = 1 << 14


@dataclass(frozen=True)
class RoomCalibration:
    """A room's `scv_init` values (DESIGN §2); data from config, never hard-coded in rules."""

    timegain_ms: float
    x_offset: float
    y_offset: float
    x_gain_mm: float
    y_gain_mm: float
    mu_per_dose1_count: float

    @classmethod
    def from_config(cls, section: dict[str, float]) -> RoomCalibration:
        return cls(**{key: float(section[key]) for key in cls.__dataclass_fields__})

    def x_mm(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=np.float64) - self.x_offset) * self.x_gain_mm

    def y_mm(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=np.float64) - self.y_offset) * self.y_gain_mm


def check_size(path: Path) -> int:
    """Number of rows; raises ValueError naming the file when the size is not whole rows."""
    size = path.stat().st_size
    if size % ROW_BYTES:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of {ROW_BYTES} (8 big-endian uint16 per row)")
    return size // ROW_BYTES


def read_ptn(path: Path) -> np.ndarray:
    """The log as an (N, 8) uint16 array in native byte order."""
    check_size(path)
    return np.fromfile(path, dtype=">u2").reshape(-1, 8).astype(np.uint16)


def write_ptn(path: Path, rows: np.ndarray) -> None:
    """Write (N, 8) integer rows as a PTN file (used by the synthetic case generator)."""
    data = np.asarray(rows)
    if data.ndim != 2 or data.shape[1] != 8:
        raise ValueError(f"PTN rows must be (N, 8), got {data.shape}")
    if data.min(initial=0) < 0 or data.max(initial=0) > 0xFFFF:
        raise ValueError("PTN values must fit in uint16")
    path.write_bytes(data.astype(">u2").tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ptn", description="Print a PTN log's rows (raw values) and a summary."
    )
    parser.add_argument("ptn", type=Path)
    parser.add_argument("--head", type=int, default=5, help="rows to print")
    args = parser.parse_args(argv)
    try:
        rows = read_ptn(args.ptn)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    beam_on = (rows[:, 7] & FLAG_ACTUAL_BEAM_ON) != 0
    print(" ".join(COLUMNS))
    for row in rows[: args.head]:
        print(" ".join(str(int(v)) for v in row))
    print(f"rows={len(rows)} beam_on_rows={int(beam_on.sum())} dose1_sum={int(rows[:, 4].astype(np.int64).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

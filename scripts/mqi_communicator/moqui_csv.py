"""The MOQUI spot-log CSV: one file per energy layer, `time_ms, x_mm, y_mm, count` per sample.

Two layouts exist (DESIGN §3): `rows` (one sample per CRLF-terminated line, float32 shortest
repr, as mqi_interpreter writes) and `single_line` (the older `t0,x0,y0,c0,t1,...` on one
line and 6-decimal floats, which some MOQUI builds still require). The reader accepts both.

Formatting millions of rows one Python call at a time is far too slow for a clinical case,
so values are formatted through lookup tables of byte strings (one entry per possible raw
value) and the rows are assembled as a byte matrix whose zero padding is squeezed out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LAYOUTS = ("rows", "single_line")
LAYER_FILE_PATTERN = re.compile(r"^(\d+)_(.+)MeV\.csv$")


def layer_file_name(layer_index: int, energy_mev: float) -> str:
    """`<NN>_<E:.2f>MeV.csv`; MOQUI reads the energy from the text after the first `_`."""
    return f"{layer_index:02d}_{energy_mev:.2f}MeV.csv"


def energy_of_file_name(name: str) -> float:
    match = LAYER_FILE_PATTERN.match(name)
    if not match:
        raise ValueError(f"{name}: not a MOQUI layer file name (<NN>_<energy>MeV.csv)")
    return float(match.group(2))


def float_table(values: np.ndarray, layout: str) -> np.ndarray:
    """Byte-string table of float values as the layout prints them (zero padded, trimmed)."""
    if layout == "single_line":
        strings = np.char.mod("%.6f", np.asarray(values, dtype=np.float32).astype(np.float64)).astype("S")
    else:
        # numpy prints float32 with the shortest repr that round-trips, like mqi_interpreter.
        strings = np.asarray(values, dtype=np.float32).astype("S")
    return _trim(strings)


def int_table(values: np.ndarray) -> np.ndarray:
    return _trim(np.asarray(values, dtype=np.int64).astype("S"))


def _trim(strings: np.ndarray) -> np.ndarray:
    width = max(1, int(np.char.str_len(strings).max())) if strings.size else 1
    return strings.astype(f"S{width}")


def encode(columns: Sequence[tuple[np.ndarray, np.ndarray]], layout: str) -> bytes:
    """Assemble rows from (table, index) pairs: row i, column k is `table_k[index_k[i]]`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CSV layout {layout!r}; expected one of {LAYOUTS}")
    if len(columns) == 0:
        return b""
    n = len(columns[0][1])
    if n == 0:
        return b""
    row_end = b"\r\n" if layout == "rows" else b","
    separators = [b","] * (len(columns) - 1) + [row_end]
    width = sum(table.dtype.itemsize + len(sep) for (table, _), sep in zip(columns, separators, strict=True))
    matrix = np.zeros((n, width), dtype=np.uint8)
    col = 0
    for (table, index), sep in zip(columns, separators, strict=True):
        w = table.dtype.itemsize
        matrix[:, col : col + w] = table.view(np.uint8).reshape(-1, w)[index]
        col += w
        for byte in sep:
            matrix[:, col] = byte
            col += 1
    data = matrix[matrix != 0].tobytes()
    # The single-line layout ends in one newline instead of a separator, like the clinic's files.
    return data[:-1] + b"\n" if layout == "single_line" else data


def encode_values(time_ms: np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray, count: np.ndarray, layout: str) -> bytes:
    """Format arbitrary sample values (plan-based mode and tests); PTN input uses tables."""
    index = np.arange(len(time_ms))
    return encode(
        [
            (float_table(time_ms, layout), index),
            (float_table(x_mm, layout), index),
            (float_table(y_mm, layout), index),
            (int_table(count), index),
        ],
        layout,
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary name and rename, so a killed job never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def read_layer(path: Path) -> np.ndarray:
    """Samples of one layer file as an (N, 4) float64 array; accepts both layouts."""
    text = Path(path).read_bytes().replace(b"\r\n", b",").replace(b"\n", b",").strip(b", \t")
    if not text:
        return np.empty((0, 4))
    try:
        values = np.array(text.split(b","), dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: not a MOQUI CSV ({exc})") from exc
    if values.size % 4:
        raise ValueError(f"{path}: {values.size} values is not a multiple of 4 (time, x, y, count)")
    return values.reshape(-1, 4)

"""PTN delivery log rows -> MOQUI CSV text (both layouts of `moqui_csv`), fast enough that P2's
whole process stays a small fraction of the clinic's converter on a clinical case
(docs/p2-speed.md).

Every value of a row comes from a small set: x and y are one of 65,536 raw values, the count one
of 65,536 dose1 values per monitor range code, the time the row number times TIMEGAIN. So each
column's text (the value as `moqui_csv` prints it, then its separator) is formatted once, only
for the entries the logs use, into a lookup table kept for the whole case, and a layer is
assembled by copying each row's table entries to their places in one output buffer, a column at
a time:

- count, y and x, in that order: each entry is copied as a fixed-width window that ends where the
  field ends (the entry right-aligned in it); what the window holds left of the field lands on
  fields of the same row that are written later and overwrite it;
- the time last, exactly (rows grouped by the length of their time text), overwriting what the
  windows left over it.

A window that would reach back into the row before (a row whose first fields are shorter than the
window) is copied exactly too. So every byte of the output ends up written by its own field, and
no copy in one step overlaps another (their order within a step does not matter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mqi_communicator.errors import InputError
from mqi_communicator.formats import moqui_csv
from mqi_communicator.formats.ptn import RoomCalibration

RAW_VALUES = 1 << 16  # every possible uint16 raw value
RANGE_CODES = 5  # DOSE1_RANGE codes 1-5


def _window_view(buffer: np.ndarray, width: int, stride: int, count: int) -> np.ndarray:
    """`count` items of `width` bytes each, `stride` bytes apart, over `buffer` (no copy)."""
    return np.ndarray((max(count, 0),), dtype=f"V{width}", buffer=buffer, strides=(stride,))


def _copy_exact(out: np.ndarray, offsets: np.ndarray, text: np.ndarray, index: np.ndarray, length: np.ndarray) -> None:
    """out[offsets[i] : offsets[i] + length[i]] = text[index[i]][: length[i]] for every i: the
    rows grouped by length (a stable radix sort of small integers), one copy per group."""
    width = text.dtype.itemsize
    order = np.argsort(length, kind="stable")
    bounds = np.searchsorted(length[order], np.arange(width + 2))
    for size in np.flatnonzero(np.diff(bounds)).tolist():
        rows = order[bounds[size] : bounds[size + 1]]
        target = _window_view(out, size, 1, len(out) - size + 1)
        target[offsets[rows]] = _window_view(text, size, width, len(text))[index[rows]]


class _TextTable:
    """Column text per entry (value text + separator), formatted on first use and kept: left
    aligned in `text`, right aligned in the first `window` bytes of each `windows` entry."""

    def __init__(self, size: int, to_text: Callable[[np.ndarray], np.ndarray], separator: bytes) -> None:
        self._to_text = to_text
        self._separator = separator
        self.text = np.zeros(size, dtype="S16")
        self.length = np.zeros(size, dtype=np.uint8)  # 0: not formatted yet (no entry is empty)
        self.window = 1
        self.windows = np.zeros(size, dtype="S8")

    def lengths(self, index: np.ndarray) -> np.ndarray:
        """Text length of each indexed entry, formatting the entries not yet in the table."""
        length = self.length[index]
        if not length.all():
            self.include([index[length == 0]])
            length = self.length[index]
        return length

    def include(self, indexes: Sequence[np.ndarray]) -> None:
        """Format every entry the index arrays name that is not in the table yet, in one go."""
        wanted = np.zeros(len(self.length), dtype=bool)
        for index in indexes:
            wanted[index] = True
        wanted[self.length != 0] = False
        if wanted.any():
            self.add(np.flatnonzero(wanted))

    def add(self, entries: np.ndarray) -> None:
        text = np.strings.add(self._to_text(entries), self._separator)
        if text.dtype.itemsize > self.text.dtype.itemsize:
            self.text = self.text.astype(text.dtype)
        self.text[entries] = text
        # str_len ignores trailing NULs only, and no value's text holds a NUL.
        self.length[entries] = np.strings.str_len(text)
        window = int(self.length.max())
        if window > self.window:
            self.window = window
            # Entries 8 or 16 bytes wide: numpy gathers those fastest.
            self.windows = np.zeros(len(self.text), dtype=f"S{8 if window <= 8 else max(16, window)}")
            entries = np.flatnonzero(self.length)
            text = self.text[entries]
        # Any filler works left of the text: the rows' other fields overwrite it.
        self.windows[entries] = np.strings.rjust(text, self.window, b" ")

    def copy_windows(self, out: np.ndarray, start: np.ndarray, index: np.ndarray) -> None:
        """The `window`-byte window of entry index[i] to out[start[i]:], for every i."""
        gathered = self.windows[index]
        source = _window_view(gathered, self.window, gathered.dtype.itemsize, len(gathered))
        _window_view(out, self.window, 1, len(out) - self.window + 1)[start] = source


class _TimeColumn:
    """The time column: text per row number, and the row numbers grouped by text length, so that a
    layer's time fields are copied exactly with no sorting per layer."""

    def __init__(self, timegain_ms: float, layout: str) -> None:
        self._timegain_ms = timegain_ms
        self._layout = layout
        self.rows = 0
        self.groups: list[tuple[int, np.ndarray, np.ndarray]] = []  # (size, rows, their text)
        self.length = np.zeros(0, dtype=np.uint8)

    def grow(self, rows: int) -> None:
        if rows <= self.rows:
            return
        rows = max(rows, 2 * self.rows, 1 << 12)
        # Through float32 exactly like mqi_interpreter's float32 columns (moqui_csv.float_table).
        text = np.strings.add(moqui_csv.float_table(np.arange(rows) * self._timegain_ms, self._layout), b",")
        self.length = np.strings.str_len(text).astype(np.uint8)
        width = text.dtype.itemsize
        self.groups = []
        for size in np.unique(self.length):
            numbers = np.flatnonzero(self.length == size)
            self.groups.append((int(size), numbers, _window_view(text, int(size), width, len(text))[numbers]))
        self.rows = rows

    def copy(self, out: np.ndarray, row_start: np.ndarray) -> None:
        """Row i's time text at out[row_start[i]:], for the layer's rows 0..len(row_start)-1."""
        for size, numbers, text in self.groups:
            count = int(np.searchsorted(numbers, len(row_start)))
            if count:
                _window_view(out, size, 1, len(out) - size + 1)[row_start[numbers[:count]]] = text[:count]


def _column(parts: Sequence[tuple[np.ndarray, int]], column: int, offsets: Sequence[int] = ()) -> np.ndarray:
    """One column of the parts' rows, run on, as table indexes (plus each part's offset)."""
    index = np.concatenate([log[:, column] for log, _ in parts]).astype(np.intp)
    if len(set(offsets)) == 1:
        index += offsets[0]
    elif offsets:
        index += np.repeat(np.asarray(offsets, dtype=np.intp), [len(log) for log, _ in parts])
    return index


@dataclass(frozen=True)
class LayerRows:
    """A layer's rows as indexes into the encoder's tables (x, y: raw values; count:
    (DOSE1_RANGE code - 1) x 65536 + dose1)."""

    x: np.ndarray
    y: np.ndarray
    count: np.ndarray


class LogCsvEncoder:
    """The CSV text of PTN log rows for one room, monitor range factors and dose dividing factor."""

    def __init__(
        self, calibration: RoomCalibration, range_factors: Sequence[float], dividing: float, layout: str
    ) -> None:
        if layout not in moqui_csv.LAYOUTS:
            raise InputError(f"unknown CSV layout {layout!r}; expected one of {moqui_csv.LAYOUTS}")
        if len(range_factors) != RANGE_CODES:
            raise InputError(
                f"monitor_range_factors: {len(range_factors)} factors, one per DOSE1_RANGE code 1-5 needed"
            )
        self.layout = layout
        factors = np.asarray(range_factors, dtype=np.float64)

        def counts(entries: np.ndarray) -> np.ndarray:
            # Entry (code - 1) * 65536 + dose1: round(dose1 x range factor / dividing factor).
            factor = factors[entries // RAW_VALUES]
            return moqui_csv.int_table(np.rint((entries % RAW_VALUES) * factor / dividing))

        self._time = _TimeColumn(calibration.timegain_ms, layout)
        self._x = _TextTable(RAW_VALUES, lambda raw: moqui_csv.float_table(calibration.x_mm(raw), layout), b",")
        self._y = _TextTable(RAW_VALUES, lambda raw: moqui_csv.float_table(calibration.y_mm(raw), layout), b",")
        self._count = _TextTable(RANGE_CODES * RAW_VALUES, counts, b"\r\n" if layout == "rows" else b",")

    def layer(self, parts: Sequence[tuple[np.ndarray, int]]) -> LayerRows:
        """A layer's rows as table indexes, from its logs in delivery order, each with its
        DOSE1_RANGE code (a layer interrupted and resumed is logged in two deliveries): the rows
        run on, numbered on from the first part's first row."""
        for _, code in parts:
            if not 1 <= code <= RANGE_CODES:
                raise InputError(f"DOSE1_RANGE {code} is not a monitor range code 1-{RANGE_CODES}")
        return LayerRows(
            x=_column(parts, 0), y=_column(parts, 1), count=_column(parts, 4, [(c - 1) * RAW_VALUES for _, c in parts])
        )

    def include(self, layers: Sequence[LayerRows]) -> None:
        """Format, in one go, the text of every value these layers hold: called with many layers
        before encoding them, each table is formatted a few times instead of a little per layer."""
        self._x.include([layer.x for layer in layers])
        self._y.include([layer.y for layer in layers])
        self._count.include([layer.count for layer in layers])
        self._time.grow(max((len(layer.x) for layer in layers), default=0))

    def encode(self, log: np.ndarray, range_code: int) -> np.ndarray:
        """One layer's CSV bytes (a uint8 array) from its (N, 8) PTN rows, any integer dtype or
        byte order."""
        return self.encode_layer(self.layer([(log, range_code)]))

    def encode_layer(self, layer: LayerRows) -> np.ndarray:
        """One layer's CSV bytes (a uint8 array)."""
        x, y, count = layer.x, layer.y, layer.count
        rows = len(x)
        if rows == 0:
            return np.zeros(0, dtype=np.uint8)
        self._time.grow(rows)
        x_length, y_length, count_length = (
            self._x.lengths(x),
            self._y.lengths(y),
            self._count.lengths(count),
        )
        row_length = self._time.length[:rows].astype(np.intp)
        row_length += x_length
        row_length += y_length
        row_length += count_length
        row_end = np.cumsum(row_length)
        row_start = row_end - row_length
        out = np.empty(int(row_end[-1]), dtype=np.uint8)
        field_end = row_end
        for table, index, length in (
            (self._count, count, count_length),
            (self._y, y, y_length),
            (self._x, x, x_length),
        ):
            window = table.window
            start = field_end - window
            inside = start >= row_start  # the window stays inside its own row
            if inside.all():
                table.copy_windows(out, start, index)
            else:
                rows_in = np.flatnonzero(inside)
                rows_out = np.flatnonzero(~inside)
                table.copy_windows(out, start[rows_in], index[rows_in])
                _copy_exact(out, field_end[rows_out] - length[rows_out], table.text, index[rows_out], length[rows_out])
            field_end = field_end - length
        self._time.copy(out, row_start)
        if self.layout == "single_line":
            out[-1] = ord("\n")  # one closing newline instead of the last separator, like the clinic's files
        return out

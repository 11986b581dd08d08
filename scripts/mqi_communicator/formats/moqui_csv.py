"""The MOQUI spot-log CSV: one file per energy layer, `time_ms, x_mm, y_mm, count` per sample.

Two layouts exist (docs/design.md#moqui-csv): `rows` (one sample per CRLF-terminated line, float32 shortest
repr, as mqi_interpreter writes) and `single_line` (the older `t0,x0,y0,c0,t1,...` on one
line and 6-decimal floats, which some MOQUI builds still require). The reader accepts both.

Formatting millions of rows one Python call at a time is far too slow for a clinical case,
so values are formatted through lookup tables of byte strings (one entry per possible raw
value) and the rows are assembled as a byte matrix whose zero padding is squeezed out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mqi_communicator.errors import InputError

LAYOUTS = ("rows", "single_line")
LAYER_FILE_PATTERN = re.compile(r"^(\d+)_(.+)MeV\.csv$")


def layer_file_name(layer_index: int, energy_mev: float, layer_count: int = 0) -> str:
    """`<NN>_<E:.2f>MeV.csv`; MOQUI reads the energy from the text after the first `_`.

    NN is zero padded to two digits (mqi_interpreter's names), or to as many digits as the
    beam's layer count has (`layer_count`), so that the names of a beam with 100 or more layers
    still sort in layer order (`007` < `100`); the energy part is unchanged."""
    width = max(2, len(str(layer_count)))
    return f"{layer_index:0{width}d}_{energy_mev:.2f}MeV.csv"


def energy_of_file_name(name: str) -> float:
    match = LAYER_FILE_PATTERN.match(name)
    if not match:
        raise InputError(f"{name}: not a MOQUI layer file name (<NN>_<energy>MeV.csv)")
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
        raise InputError(f"unknown CSV layout {layout!r}; expected one of {LAYOUTS}")
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


def read_layer(path: Path) -> np.ndarray:
    """Samples of one layer file as an (N, 4) float64 array; accepts both layouts."""
    text = Path(path).read_bytes().replace(b"\r\n", b",").replace(b"\n", b",").strip(b", \t")
    if not text:
        return np.empty((0, 4))
    try:
        values = np.array(text.split(b","), dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: not a MOQUI CSV ({exc})") from exc
    if values.size % 4:
        raise InputError(f"{path}: {values.size} values is not a multiple of 4 (time, x, y, count)")
    return values.reshape(-1, 4)


# --- Fast reader -------------------------------------------------------------------------
# `read_layer` hands every value to numpy's float parser one token at a time, which costs
# about 1 s per million samples; the built-in engine must read a clinical beam (~1 M samples)
# well within its 2 s budget. `read_layer_fast` parses the same files into the bit-identical
# array with whole-array integer arithmetic: each token is loaded right-aligned as two 8-byte
# words and its digits combined eight at a time (SWAR), so the cost is a few dozen numpy passes
# over the token array. Tokens it does not handle in bulk (exponent notation, more than 16
# characters) are parsed one by one with `float`; anything else unusual (spaces, letters, empty
# fields, stray CRs) goes to `read_layer`, which then accepts or rejects the file as before.

_U64 = np.uint64
_BYTES_ONE = _U64(0x0101010101010101)
_BYTES_ASCII_ZERO = _U64(0x3030303030303030)
_BYTES_LOW7 = _U64(0x7F7F7F7F7F7F7F7F)
_BYTES_HIGH = _U64(0x8080808080808080)
_BYTES_DIGIT_CEIL = _U64(0x4646464646464646)  # byte + 0x46 sets bit 7 iff byte > '9'
# Keep the top n bytes of a little-endian word (the last n characters of a token) and put '0'
# into the others, so characters of the previous token read as leading zeros.
_KEEP = np.array(
    [0] + [(0xFFFFFFFFFFFFFFFF << (8 * (8 - n))) & 0xFFFFFFFFFFFFFFFF for n in range(1, 9)], dtype=np.uint64
)
_FILL = _BYTES_ASCII_ZERO & ~_KEEP
_POW10 = 10 ** np.arange(18, dtype=np.uint64)
_POW10_F = 10.0 ** np.arange(18)
_PLAIN_BYTES = b"0123456789.-,\r\n"
_EXPONENT_BYTES = b"eE+"


def _bytes_equal(words: np.ndarray, char: int) -> np.ndarray:
    """0x80 in every byte of `words` equal to `char` (exact, no false positives), else 0."""
    t = words ^ (_BYTES_ONE * _U64(char))
    return ~(((t & _BYTES_LOW7) + _BYTES_LOW7) | t | _BYTES_LOW7)


def _eight_digits(words: np.ndarray) -> np.ndarray:
    """Value of eight ASCII digits per word, first character in the lowest byte."""
    w = words - _BYTES_ASCII_ZERO
    w = (w * _U64(10) + (w >> _U64(8))) & _U64(0x00FF00FF00FF00FF)
    w = (w * _U64(100) + (w >> _U64(16))) & _U64(0x0000FFFF0000FFFF)
    return (w * _U64(10000) + (w >> _U64(32))) & _U64(0x00000000FFFFFFFF)


def _bytes_after_dot(dot: np.ndarray) -> np.ndarray:
    """Bytes above the single 0x80 marker in `dot` (-1 where there is none)."""
    return (63 - np.bitwise_count(dot - _U64(1)).astype(np.int64)) // 8


def _not_digits(words: np.ndarray) -> np.ndarray:
    """Nonzero where some byte of the word is not an ASCII digit (bytes are known < 0x80)."""
    return ((words + _BYTES_DIGIT_CEIL) | ~((words | _BYTES_HIGH) - _BYTES_ASCII_ZERO)) & _BYTES_HIGH


def _load_words(words: np.ndarray, at: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The n characters before each `at`, right-aligned in a word with '0' before them and the
    dot turned into a '0'; and the dot marker (0x80 in the dot's byte)."""
    w = (words[at] & _KEEP[n]) | _FILL[n]
    dot = _bytes_equal(w, 46)
    return w + ((dot >> _U64(7)) << _U64(1)), dot  # '.' + 2 == '0'


def parse_values(data: bytes, chunk_bytes: int = 1 << 19) -> np.ndarray | None:
    """All comma/newline separated decimal values in `data`, bit-identical to `read_layer`.

    Returns None when the data holds something outside the fast path (then `read_layer`
    decides); the caller reshapes to (N, 4). Large data is parsed in chunks that end after a
    separator, so the working arrays stay small and in cache.
    """
    parts = []
    start = 0
    while start < len(data):
        end = len(data) if len(data) - start <= chunk_bytes else data.find(b",", start + chunk_bytes) + 1
        if end <= 0:
            end = len(data)
        if start > 0 and data[start] in b",\r\n":
            return None  # an empty field at a chunk boundary: leave it to read_layer
        values = _parse_chunk(data[start:end])
        if values is None:
            return None
        parts.append(values)
        start = end
    return np.concatenate(parts) if parts else np.empty(0)


def _parse_chunk(data: bytes) -> np.ndarray | None:
    odd = data.translate(None, _PLAIN_BYTES)
    if odd and odd.translate(None, _EXPONENT_BYTES):
        return None
    pad = 16
    buf = b"," * pad + data + b","
    b = np.frombuffer(buf, dtype=np.uint8)
    seps = np.flatnonzero((b == 44) | (b == 10))
    ends = seps[1:]
    crlf = (b[ends - 1] == 13) & (b[ends] == 10)  # a row's CR ends its last token
    if np.count_nonzero(crlf) != data.count(b"\r"):
        return None  # a CR outside a CRLF
    ends = ends - crlf
    lengths = ends - seps[:-1] - 1
    nonempty = np.flatnonzero(lengths > 0)
    if nonempty.size == 0:
        return np.empty(0)
    first, last = nonempty[0], nonempty[-1]
    if nonempty.size != last - first + 1:
        return None  # an empty field inside the data
    ends = ends[first : last + 1]
    lengths = lengths[first : last + 1]

    negative = b[ends - lengths] == 45
    digits = np.minimum(lengths - negative, 16)
    n_lo = np.minimum(digits, 8)
    words = np.ndarray(shape=(b.size - 7,), dtype="<u8", buffer=buf, strides=(1,))
    lo, dot_lo = _load_words(words, ends - 8, n_lo)
    bad = _not_digits(lo)
    dots = np.bitwise_count(dot_lo)
    whole = _eight_digits(lo)
    q = np.where(dot_lo != 0, _bytes_after_dot(dot_lo), 0)
    long = np.flatnonzero(digits > 8)  # few in the rows layout: handle their first word apart
    if long.size:
        hi, dot_hi = _load_words(words, ends[long] - 16, digits[long] - 8)
        bad[long] |= _not_digits(hi)
        dots[long] += np.bitwise_count(dot_hi)
        whole[long] += _eight_digits(hi) * _U64(100_000_000)
        q[long] = np.where(dot_hi != 0, _bytes_after_dot(dot_hi) + 8, q[long])

    special = lengths - negative > 16
    if odd:
        marks = np.flatnonzero((b == 101) | (b == 69) | (b == 43))
        special[np.searchsorted(ends, marks)] = True
    # Every kept byte must now be a digit, a token holds at most one dot and at least one
    # digit ("-" or "." alone is not a number); else leave the file to read_layer.
    if np.any(((bad != 0) | (dots > 1) | (digits <= dots)) & ~special):
        return None
    # `whole` read the dot as a 0 digit: drop it to get the integer of all digits.
    mantissa = np.where(dots > 0, (whole // _POW10[q + 1]) * _POW10[q] + whole % _POW10[q], whole)
    values = mantissa.astype(np.float64) / _POW10_F[q]  # exact operands: one correct rounding
    values *= 1.0 - 2.0 * negative  # -0.0 stays -0.0, like float()
    for index in np.flatnonzero(special):
        token = buf[ends[index] - lengths[index] : ends[index]]
        try:
            values[index] = float(token)
        except ValueError:
            return None
    return values


def read_layer_fast(path: Path) -> np.ndarray:
    """`read_layer` (same array, same errors) at several times its speed; see `parse_values`."""
    values = parse_values(Path(path).read_bytes())
    if values is None:
        return read_layer(path)
    if values.size % 4:
        raise InputError(f"{path}: {values.size} values is not a multiple of 4 (time, x, y, count)")
    return values.reshape(-1, 4)

"""P2's fast CSV writer (formats/log_csv.py) against docs/design.md#moqui-csv written out sample by
sample, on logs made to reach its every path: short first rows (the exact copies instead of the
windows), zero and extreme raw values, every monitor range code, a layer logged in two parts, both
layouts."""

from __future__ import annotations

import numpy as np
import pytest

from mqi_communicator.formats import ptn
from mqi_communicator.formats.log_csv import LogCsvEncoder

RANGE_FACTORS = [0.3404, 1.0, 2.978723404255319, 8.936170212765957, 26.80851063829787]


def reference_rows(
    log: np.ndarray, cal: ptn.RoomCalibration, code: int, dividing: float, layout: str, first_row: int = 0
) -> list[str]:
    """One Python format call per value: float32 shortest repr (rows) or %.6f (single_line)."""
    rows = []
    for i, row in enumerate(log, start=first_row):
        values = [
            np.float32(i * cal.timegain_ms),
            np.float32((int(row[0]) - cal.x_offset) * (cal.x_gain_mm * cal.x_sign)),
            np.float32((int(row[1]) - cal.y_offset) * cal.y_gain_mm),
        ]
        text = [str(v) if layout == "rows" else f"{float(v):.6f}" for v in values]
        rows.append(",".join([*text, str(int(np.rint(int(row[4]) * RANGE_FACTORS[code - 1] / dividing)))]))
    return rows


def joined(rows: list[str], layout: str) -> bytes:
    return ("".join(r + "\r\n" for r in rows) if layout == "rows" else ",".join(rows) + "\n").encode()


def hard_log(cal: ptn.RoomCalibration, rows: int, seed: int) -> np.ndarray:
    """Rows a writer gets wrong first: the beam at the raw offsets (x and y print as 0.0 or -0.0,
    shorter than the window of the longest value, while the time is still short too), the
    extremes 0 and 65535, then the jitter of a real layer."""
    rng = np.random.default_rng(seed)
    log = rng.integers(0, 3, (rows, 8), dtype=np.int64)
    log[:, 0] = rng.normal(cal.x_offset, 9000, rows).clip(0, 65535)
    log[:, 1] = rng.normal(cal.y_offset, 9000, rows).clip(0, 65535)
    log[:, 4] = rng.integers(0, 400, rows)
    log[:12, 0] = cal.x_offset
    log[:12, 1] = cal.y_offset
    log[3:6, 4] = 0
    log[12] = [0, 0, 0, 0, 65535, 0, 0, 0]
    log[13] = [65535, 65535, 0, 0, 65535, 0, 0, 0]
    return log.astype(">u2")  # as the file holds them


@pytest.mark.parametrize("layout", ["rows", "single_line"])
@pytest.mark.parametrize("room", ["G1", "G2"])
def test_every_code_and_dividing_factor_matches_the_per_row_reference(config: dict, room: str, layout: str) -> None:
    cal = ptn.RoomCalibration.from_config(config["rooms"][room])
    for dividing in (1.0, 3.7):
        encoder = LogCsvEncoder(cal, config["monitor_range_factors"], dividing, layout)
        for code in range(1, 6):
            log = hard_log(cal, 3000, seed=code)
            expected = joined(reference_rows(log, cal, code, dividing, layout), layout)
            assert encoder.encode(log, code).tobytes() == expected, (room, layout, dividing, code)


def test_a_layer_in_two_parts_runs_on_with_each_part_s_range(config: dict) -> None:
    """An interrupted layer resumed in a second delivery (docs/fractions.md): one file, the rows
    numbered on, each part's counts with its own monitor range factor."""
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    first, second = hard_log(cal, 700, seed=1), hard_log(cal, 900, seed=2)
    encoder = LogCsvEncoder(cal, config["monitor_range_factors"], 1.0, "rows")
    layer = encoder.layer([(first, 2), (second, 4)])
    expected = reference_rows(first, cal, 2, 1.0, "rows") + reference_rows(second, cal, 4, 1.0, "rows", 700)
    assert encoder.encode_layer(layer).tobytes() == joined(expected, "rows")


def test_tables_formatted_up_front_or_on_the_way_give_the_same_bytes(config: dict) -> None:
    """`include` (a beam's values formatted in one go) is an optimisation only: an encoder that
    meets each value as it goes, its windows widening on the way, writes the same bytes."""
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    logs = [hard_log(cal, n, seed=n) for n in (40, 5000, 17, 2500)]
    prepared = LogCsvEncoder(cal, config["monitor_range_factors"], 1.0, "rows")
    layers = [prepared.layer([(log, 3)]) for log in logs]
    prepared.include(layers)
    lazy = LogCsvEncoder(cal, config["monitor_range_factors"], 1.0, "rows")
    for log, layer in zip(logs, layers, strict=True):
        expected = joined(reference_rows(log, cal, 3, 1.0, "rows"), "rows")
        assert prepared.encode_layer(layer).tobytes() == expected
        assert lazy.encode(log, 3).tobytes() == expected


def test_empty_layer_and_bad_range_code(config: dict) -> None:
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G1"])
    encoder = LogCsvEncoder(cal, config["monitor_range_factors"], 1.0, "rows")
    assert encoder.encode(np.zeros((0, 8), dtype=">u2"), 2).tobytes() == b""
    with pytest.raises(ValueError, match="DOSE1_RANGE 6 is not a monitor range code"):
        encoder.encode(hard_log(cal, 20, seed=0), 6)
    with pytest.raises(ValueError, match="unknown CSV layout"):
        LogCsvEncoder(cal, config["monitor_range_factors"], 1.0, "columns")
    with pytest.raises(ValueError, match="4 factors, one per DOSE1_RANGE code 1-5 needed"):
        LogCsvEncoder(cal, config["monitor_range_factors"][:4], 1.0, "rows")

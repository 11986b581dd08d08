"""Absolute dose calibration: the Gy per raw dose unit of each engine and room, as a record.

A dose line can PASS only on a calibrated absolute dose (docs/qa.md, "Calibration"). The factor
is never typed into the config: a physicist derives it with `bin/mqi calibrate` from a reference
field (its TPS dose, or a measured point dose), and the command appends an entry to the record
file (`calibration.record`, default `config/calibration.yaml`) with the date, the method, the
source files' sha256 and who set it. The newest entry of an engine and room is the current one;
older entries stay as history. An entry older than `calibration.max_age_days` is stale: the
doses are still written in Gy with it, but the QA verdict says the dose scale is not verified.

The factor is applied once, when P3 writes the RT Dose (`rtdose --dose-scale`); a
`DoseScaleFactor` in the MOQUI template would scale a second time and is refused by the config
check (`settings.path_problems`).
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mqi_communicator.errors import MqiError
from mqi_communicator.files import write_atomic

ENGINES = ("builtin", "moqui")
# The label of a result whose dose scale is not a current calibration, wherever it is shown.
UNVERIFIED_LABEL = "DOSE SCALE NOT VERIFIED"
METHODS = ("tps", "measured")
HEADER = (
    "# Absolute dose calibration record, written by `bin/mqi calibrate` (docs/qa.md, Calibration).\n"
    "# One entry per calibration, newest last; the newest of an engine and room is the current one.\n"
    "# Do not edit by hand: a new calibration is a new entry, so the history stays readable.\n"
)


class CalibrationError(MqiError, ValueError):
    """A calibration record or derivation that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Calibration:
    """One calibration of one engine and room: `gy_per_unit` turns raw dose into Gy."""

    engine: str
    room: str
    gy_per_unit: float
    date: str  # ISO 8601 with time zone
    set_by: str
    method: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def age_days(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (now - datetime.datetime.fromisoformat(self.date)).total_seconds() / 86400.0


def engine_kind(config: dict[str, Any]) -> str:
    """Which engine the doses come from: "builtin" or "moqui" (any tps_env)."""
    return "builtin" if config["executables"]["moqui"] == "builtin" else "moqui"


def _entry(raw: Any, where: str) -> Calibration:
    if not isinstance(raw, dict):
        raise CalibrationError(f"{where}: an entry must be a mapping, not {raw!r}")
    missing = [k for k in Calibration.__dataclass_fields__ if raw.get(k) in (None, "")]
    if missing:
        raise CalibrationError(f"{where}: entry without {', '.join(missing)}")
    if raw["engine"] not in ENGINES or raw["method"] not in METHODS:
        raise CalibrationError(f"{where}: engine must be one of {ENGINES} and method one of {METHODS}")
    factor = float(raw["gy_per_unit"])
    if not factor > 0 or factor == float("inf"):
        raise CalibrationError(f"{where}: gy_per_unit must be a number > 0, not {raw['gy_per_unit']!r}")
    try:
        when = datetime.datetime.fromisoformat(str(raw["date"]))
    except ValueError as exc:
        raise CalibrationError(f"{where}: date {raw['date']!r} is not ISO 8601") from exc
    if when.tzinfo is None:
        raise CalibrationError(f"{where}: date {raw['date']!r} has no time zone")
    return Calibration(
        str(raw["engine"]),
        str(raw["room"]),
        factor,
        when.isoformat(timespec="seconds"),
        str(raw["set_by"]),
        str(raw["method"]),
        str(raw["source"]),
    )


def read_record(path: Path) -> list[Calibration]:
    """Every entry of the record, oldest first; a missing file is an empty record."""
    if not path.is_file():
        return []
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CalibrationError(f"{path}: not valid YAML ({exc})") from exc
    entries = loaded.get("entries") if isinstance(loaded, dict) else None
    if not isinstance(entries, list):
        raise CalibrationError(f"{path}: expected a mapping with a list 'entries'")
    return [_entry(raw, f"{path}, entry {k + 1}") for k, raw in enumerate(entries)]


def current(path: Path, engine: str, room: str) -> Calibration | None:
    """The newest entry of this engine and room, or None."""
    mine = [c for c in read_record(path) if c.engine == engine and c.room == room]
    return max(mine, key=lambda c: datetime.datetime.fromisoformat(c.date)) if mine else None


def append(path: Path, entry: Calibration) -> None:
    """Add an entry to the record (atomically; earlier entries are kept byte for byte)."""
    entries = [c.as_dict() for c in read_record(path)] + [entry.as_dict()]
    text = HEADER + yaml.safe_dump({"entries": entries}, sort_keys=False, allow_unicode=True)
    write_atomic(path, text.encode())


def status(entry: dict[str, Any] | None, max_age_days: float, now: datetime.datetime | None = None) -> dict[str, Any]:
    """How the dose scale of a result stands: {"state": current | stale | missing, "reason", entry}.
    Only "current" lets a dose line PASS."""
    if entry is None:
        return {
            "state": "missing",
            "reason": "dose scale not verified: no calibration of this engine and room (bin/mqi calibrate)",
        }
    calibration = _entry(entry, "calibration")
    age = calibration.age_days(now)
    if age > max_age_days:
        return {
            **calibration.as_dict(),
            "state": "stale",
            "age_days": round(age, 1),
            "reason": (
                f"dose scale not verified: the calibration of {calibration.date[:10]} by {calibration.set_by} is "
                f"{age:.0f} days old (calibration.max_age_days {max_age_days:g}); calibrate again"
            ),
        }
    return {
        **calibration.as_dict(),
        "state": "current",
        "age_days": round(age, 1),
        "reason": f"calibrated {calibration.date[:10]} by {calibration.set_by} ({calibration.method})",
    }

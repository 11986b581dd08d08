"""Where a case's fraction records are, and the cheap watch of a finished case's folder.

    <processing>/fractions/<n>.json   fraction n's delivery record (qa/fraction_records.py)
    <processing>/fractions/seen       the case folder as the last record saw it

Light on purpose (the standard library only): `bin/mqi status` and the choice of a run's targets
read these for every finished case (docs/fractions.md).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mqi_communicator.files import write_atomic

RECORDS = "fractions"
SEEN = "fractions/seen"
FRESH_NS = 2_000_000_000  # 2 s: the coarsest modification-time tick of common file systems (FAT)


def record_path(processing: Path, number: int) -> Path:
    return processing / RECORDS / f"{number}.json"


def recorded(processing: Path) -> list[int]:
    """Numbers of the fractions already recorded."""
    folder = processing / RECORDS
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit())


def summary_line(processing: Path) -> str:
    """The fraction records at a glance, as `bin/mqi status` shows them: `fractions 1-3 PASS`, or
    the ones that are not PASS (`fractions 1-3: 2 FAIL`); empty without records."""
    verdicts = {}
    for number in recorded(processing):
        try:
            verdicts[number] = str(json.loads(record_path(processing, number).read_text())["verdict"])
        except (OSError, ValueError, KeyError, TypeError):
            verdicts[number] = "unreadable"
    if not verdicts:
        return ""
    span = f"{min(verdicts)}-{max(verdicts)}" if len(verdicts) > 1 else str(min(verdicts))
    bad = [f"{n} {v}" for n, v in verdicts.items() if v != "PASS"]
    return f"fractions {span}: {', '.join(bad)}" if bad else f"fractions {span} PASS"


@dataclass(frozen=True)
class Seen:
    """The case folder's modification time and, where delivery folders sit deeper, those of the
    folders holding them: a new delivery folder changes its parent folder's time."""

    case_mtime_ns: int
    extra: dict[str, int]


def seen_now(case_dir: Path, delivery_folders: list[Path]) -> Seen:
    """Taken before the case's deliveries are read: a folder arriving meanwhile is seen next time.
    A folder changed in the last FRESH_NS may change again within the same tick of a coarse
    file system clock, unseen: such a time is remembered off by one, so it is looked at again."""
    case_mtime_ns = case_dir.stat().st_mtime_ns
    parents = {f.parent for f in delivery_folders if f.parent != case_dir}
    extra = {str(p.relative_to(case_dir)): p.stat().st_mtime_ns for p in sorted(parents)}
    if time.time_ns() - max([case_mtime_ns, *extra.values()]) < FRESH_NS:
        case_mtime_ns -= 1
    return Seen(case_mtime_ns, extra)


def write_seen(processing: Path, seen: Seen) -> None:
    """The stamp: its own mtime is the case folder's, its content (usually empty) the others."""
    path = processing / SEEN
    write_atomic(path, json.dumps(seen.extra).encode() if seen.extra else b"")
    os.utime(path, ns=(seen.case_mtime_ns, seen.case_mtime_ns))


def needs_scan(case_dir: Path, processing: Path) -> bool:
    """Whether a delivery folder may have arrived since the last record: one stat of the stamp
    and one of the case folder (a case finished before fraction records existed has no stamp and
    is not watched)."""
    try:
        seen = os.stat(processing / SEEN)
        if os.stat(case_dir).st_mtime_ns != seen.st_mtime_ns:
            return True
        if not seen.st_size:
            return False
        extra = json.loads((processing / SEEN).read_text())
        return any(os.stat(case_dir / rel).st_mtime_ns != ns for rel, ns in extra.items())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True

"""The disk guard: no new case starts while a filesystem it writes to or reads from is nearly full
(docs/disk-guard.md).

Checked when a run plans its work (rules/common.smk, case selection): below
`disk_guard.min_free_gb` on the filesystem of the scan folder or of any output folder (processing,
raw, DICOM, the working folder with logs/ and .snakemake/), no case that still needs work enters
the run. Nothing starts, so nothing is half-written, and what earlier runs wrote stays as it is;
the cases wait (`bin/mqi status` says why) and start with the first run that finds space again.
bin/mqi-run sends one alert when the guard holds cases back and one when it no longer does
(`alert` below; ledger `.mqi/alerts.json`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.ops import alerts

PROG = "python -m mqi_communicator.ops.disk_guard"
ALERT_KEY = "disk_low:floor"
GB = 1e9


@dataclass(frozen=True)
class Shortage:
    """A filesystem below the floor, named by the first configured folder on it."""

    what: str  # e.g. "scan folder"
    path: Path
    free_bytes: int
    floor_bytes: float

    def __str__(self) -> str:
        return (
            f"{self.what} {self.path}: {self.free_bytes / GB:.2f} GB free, "
            f"below disk_guard.min_free_gb={self.floor_bytes / GB:g}"
        )


def _existing(path: Path) -> Path:
    """The folder itself, or its nearest existing parent (an output folder may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _template_root(template: str) -> Path:
    """The part of a `{case_id}` path template above the case: where every case's files go."""
    return Path(template.split("{case_id}", 1)[0] or ".")


def watched(config: dict[str, Any], workdir: Path) -> list[tuple[str, Path]]:
    local = config["paths"]["local"]
    return [
        ("scan folder", workdir / local["scan_directory"]),
        ("processing folder", workdir / _template_root(local["processing_directory"])),
        ("raw output folder", workdir / _template_root(local["raw_output_directory"])),
        ("DICOM output folder", workdir / _template_root(local["final_dicom_directory"])),
        ("working folder", workdir),
    ]


def shortages(config: dict[str, Any], workdir: Path) -> list[Shortage]:
    """The filesystems (one entry each) with less free space than the floor; empty when the
    check is off (min_free_gb 0). Free space is what an unprivileged writer gets (f_bavail)."""
    floor = float(config["disk_guard"]["min_free_gb"]) * GB
    if floor <= 0:
        return []
    found: list[Shortage] = []
    seen: set[int] = set()
    for what, folder in watched(config, workdir):
        existing = _existing(folder)
        device = existing.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        stats = os.statvfs(existing)
        free = stats.f_bavail * stats.f_frsize
        if free < floor:
            found.append(Shortage(what, folder, free, floor))
    return found


def held_back_reason(found: list[Shortage]) -> str:
    return "disk guard: " + "; ".join(str(s) for s in found)


def alert(config: dict[str, Any], workdir: Path) -> str:
    """One alert when the guard starts holding cases back, one when it stops (ledger
    `.mqi/alerts.json`); a line for the runner's log, empty when there is nothing to say."""
    found = shortages(config, workdir)
    ledger = workdir / ".mqi" / "alerts.json"
    if found:
        reason = held_back_reason(found)
        if alerts.channels(config["alerts"]):
            alerts.notify_once(alerts.disk_low(reason), ledger, ALERT_KEY, config["alerts"])
        return reason
    if alerts.resolve(alerts.disk_recovered(), ledger, ALERT_KEY, config["alerts"]):
        return "disk guard: enough free space again (alert sent)"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    settings.add_site_arguments(parser, beside_workdir=True)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="Say whether new cases are held back; exit 1 if they are.")
    sub.add_parser("alert", help="check, and alert once when cases are held back (and once when no longer).")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        config = settings.load_site(settings.site_config(args.configfile, workdir), workdir)
        if args.command == "alert":
            said = alert(config, workdir)
            if said:
                print(said)
            return 0
        found = shortages(config, workdir)
    except (OSError, ValueError) as exc:
        print(f"disk guard: {exc}", file=sys.stderr)
        return 2
    print(held_back_reason(found) if found else "disk guard: enough free space")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every delivered fraction's delivery check, one append-only record per fraction (docs/fractions.md).

    <processing>/fractions/<n>.json   fraction n: its deliveries, per beam the delivery check
                                      (qa/delivery.check_beam, a resumed layer whole) and verdict
    <processing>/fractions/seen       the case folder as the last record saw it (intake/fraction_watch.py)

A record is written once and never rewritten; the finished dose and QA are never touched. The
case's fractions are grouped by `fractions.case_fractions`; a fraction is recorded once it is
complete (every treatment beam delivered layers 1..N). Later fractions arriving in a finished
case become new records (the workflow asks `fraction_watch.needs_scan`: two stats per finished case).

    python -m mqi_communicator.qa.fraction_records --case CASE_DIR --fraction N \
        --output <processing>/fractions/N.json --settings config/config.yaml
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mqi_communicator import __version__, cli, settings
from mqi_communicator.errors import CaseError
from mqi_communicator.files import sha256_of, write_json_atomic
from mqi_communicator.formats.plan import Plan, find_plan, read_plan
from mqi_communicator.intake.case import case_source
from mqi_communicator.intake.delivery_folders import delivery_header, find_delivery_folders, read_delivery
from mqi_communicator.intake.fraction_watch import Seen, record_path, recorded, seen_now, write_seen
from mqi_communicator.intake.fractions import CaseFraction, case_fractions
from mqi_communicator.qa import delivery, resumed, verdict


def _quiet(folder: Path, quiet_seconds: float, now: float) -> bool:
    """A delivery folder still being copied is not read yet (application.ready_quiet_seconds)."""
    if quiet_seconds <= 0:
        return True
    newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
    return now - newest >= quiet_seconds


def _arrived(case_dir: Path, config: dict[str, Any], now: float | None = None) -> list[Path]:
    quiet = float(config["application"]["ready_quiet_seconds"])
    current = time.time() if now is None else now
    return [f for f in find_delivery_folders(case_dir) if _quiet(f, quiet, current)]


def pending(
    case_dir: Path, processing: Path, config: dict[str, Any], now: float | None = None, plan: Plan | None = None
) -> list[int]:
    """Complete fractions without a record, from PlanInfo.txt alone (no PTN is read; the plan is
    read unless given). A case in plan mode, or whose plan or PlanInfo cannot be read, has none
    here: intake, or the record's own job, reports such problems with the file."""
    try:
        if case_source(case_dir, config) != "logs":
            return []
        plan = plan or read_plan(find_plan(case_dir))
        headers = [delivery_header(case_dir, folder, plan) for folder in _arrived(case_dir, config, now)]
    except (CaseError, ValueError, OSError):
        return []
    done = set(recorded(processing))
    return [f.number for f in case_fractions(plan, headers) if f.complete and f.number not in done]


def scan_finished(case_dir: Path, processing: Path, config: dict[str, Any]) -> tuple[list[int], Seen | None]:
    """A finished case whose folder changed: its fractions to record, and, when there are none
    and no delivery folder is still being copied, the folder as seen now (to remember, so it is
    not read again until it changes)."""
    seen = seen_now(case_dir, find_delivery_folders(case_dir))
    numbers = pending(case_dir, processing, config)
    settled = len(_arrived(case_dir, config)) == len(find_delivery_folders(case_dir))
    return numbers, (seen if settled and not numbers else None)


# -- a record ---------------------------------------------------------------------------------
def check_conflicts(processing: Path, fractions: list[CaseFraction]) -> None:
    """Records are append-only: a recorded fraction that the case now groups otherwise (a delivery
    folder arrived out of order) is an error naming the record, never a silent rewrite."""
    by_number = {f.number: f for f in fractions}
    for number in recorded(processing):
        path = record_path(processing, number)
        try:
            folders = sorted(json.loads(path.read_text())["deliveries"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CaseError(path, f"unreadable fraction record ({exc})") from exc
        now = by_number[number].folders if number in by_number else []
        if folders != now:
            raise CaseError(
                path,
                f"fraction {number} was recorded with deliveries {folders}, the case now groups {now}; "
                "records are never rewritten: `bin/mqi reprocess` the case to record its fractions again",
            )


def fraction_record(
    case_dir: Path, plan_path: Path, plan: Plan, fraction: CaseFraction, config: dict[str, Any]
) -> dict[str, Any]:
    """The delivery check of every treatment beam of one complete fraction."""
    qa = config["qa"]
    room = delivery.RoomCheck.from_config(config, plan.room)
    beams, inputs = [], {str(plan_path.relative_to(case_dir)): sha256_of(plan_path)}
    for number, deliveries in sorted(fraction.beams.items()):
        beam = plan.beam(number)
        assert beam is not None
        entries = [asdict(d) for d in deliveries]
        for d in deliveries:
            inputs |= {f"{d.folder}/{p.file}": p.sha256 for p in d.ptn}
        check = resumed.check_beam(beam, entries, case_dir, room)
        beams.append(
            {
                "number": beam.number,
                "name": beam.name,
                "deliveries": [d.folder for d in deliveries],
                "irradiation_times": [d.irradiation_time for d in deliveries],
                # Layers interrupted and resumed: logged in two deliveries, checked as one log.
                "resumed_layers": [
                    b.start_layer for a, b in itertools.pairwise(deliveries) if b.start_layer == a.stop_layer
                ],
                "verdict": check["verdict"],
                "delivery": check,
            }
        )
    return {
        "case_id": case_dir.name,
        "fraction": fraction.number,
        "verdict": verdict.worst([b["verdict"] for b in beams]),
        "deliveries": fraction.folders,
        "beams": beams,
        "plan_sop_instance_uid": plan.sop_instance_uid,
        "room": plan.room,
        "criteria": qa["delivery"],
        "inputs": inputs,
        "software": {"mqi_communicator": __version__},
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def record_fraction(case_dir: Path, output: Path, number: int, config: dict[str, Any]) -> dict[str, Any]:
    """Write fraction `number`'s record to `output` (never over an existing one); returns it."""
    if output.exists():
        raise CaseError(output, "exists; fraction records are never rewritten")
    processing = output.parent.parent
    seen = seen_now(case_dir, find_delivery_folders(case_dir))
    plan_path = find_plan(case_dir)
    plan = read_plan(plan_path)
    folders = _arrived(case_dir, config)
    settled = len(folders) == len(find_delivery_folders(case_dir))
    fractions = case_fractions(plan, [read_delivery(case_dir, folder, plan) for folder in folders])
    check_conflicts(processing, fractions)
    fraction = next((f for f in fractions if f.number == number), None)
    if fraction is None or not fraction.complete:
        what = "is not delivered" if fraction is None else f"is incomplete (layers missing: {fraction.missing()})"
        raise CaseError(case_dir, f"fraction {number} {what}")
    record = fraction_record(case_dir, plan_path, plan, fraction, config)
    write_json_atomic(output, record)
    if settled:  # a folder still being copied is looked at again once it is quiet
        write_seen(processing, seen)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.qa.fraction_records", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--case", type=Path, required=True, help="the case folder (read only)")
    parser.add_argument("--fraction", type=int, required=True, help="the fraction's number (1 = the first)")
    parser.add_argument("--output", type=Path, required=True, help="<processing>/fractions/<n>.json")
    settings.add_argument(parser)
    return cli.run(
        parser,
        _fraction_check,
        argv,
        step="qa.fraction_records",
        label="FRACTION CHECK",
        subject=lambda a: f"case {a.case.name}",
    )


def _fraction_check(args: argparse.Namespace) -> int:
    record = record_fraction(args.case, args.output, args.fraction, settings.load(args.settings))
    print(f"case {record['case_id']} fraction {record['fraction']}: {record['verdict']}")
    for beam in record["beams"]:
        reasons = "; ".join(beam["delivery"].get("reasons", []))
        print(f"  beam {beam['number']} ({beam['name']}) {beam['verdict']} {reasons}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`bin/mqi verify`: has a finished case's input changed since it finished? Content decides.

A finished case is never recomputed on its own; a case whose files were replaced afterwards is
marked `changed` (status) and reported once (alert), and someone decides (`bin/mqi reprocess`).
New delivery folders are later fractions, each checked on its own (docs/fractions.md), not changes.
The timer's runner checks a few finished cases per run (`--sweep N`, in turn, oldest check
first), so the cost of a run does not grow with the number of finished cases; a check reads the
case's files only when a file's name, size or times differ from what intake recorded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import write_json_atomic
from mqi_communicator.intake.case_inputs import changed_files, stat_fingerprint
from mqi_communicator.ops import alerts, state

CURSOR = Path(".mqi") / "verify-cursor.json"


def new_delivery_folders(case_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """Delivery folders of a finished case that intake did not see: later fractions, each given
    its own delivery record (docs/fractions.md); their files are not changes of what the finished
    result used."""
    # Imported here: `bin/mqi status` imports this module and must not load pydicom and scipy.
    from mqi_communicator.intake.delivery_folders import find_delivery_folders

    if manifest.get("mode") != "logs":  # a plan-based result gets no fraction records: logs are a change
        return []
    known = {d.get("folder") for d in manifest.get("deliveries", [])}
    found = [f.relative_to(case_dir) for f in find_delivery_folders(case_dir)]
    return [f for f in found if str(f) not in known]


def verify_case(layout: state.Layout, case_id: str, alerts_config: dict[str, Any] | None) -> list[str]:
    """Changed files of a finished case ([] when unchanged or not finished); records and reports."""
    processing = layout.processing(case_id)
    if not (processing / state.SUMMARY).exists():
        return []
    manifest = state.read_json(processing / "intake.json") or {}
    inputs = manifest.get("inputs") or {}
    case_dir = layout.scan_dir / case_id
    if not inputs or (inputs.get("fingerprint") == stat_fingerprint(case_dir)):
        return []
    recorded = inputs.get("files", {})
    later = new_delivery_folders(case_dir, manifest)
    changed = [
        f
        for f in changed_files(case_dir, recorded)
        if f in recorded or not any(Path(f).is_relative_to(d) for d in later)
    ]
    record_path = processing / state.CHANGED
    if not changed:
        record_path.unlink(missing_ok=True)
        return []
    write_json_atomic(record_path, {"files": changed, "detected": time.time()})
    if alerts_config is not None:
        key = "changed:" + ",".join(changed)
        alerts.notify_once(alerts.case_changed(case_id, changed), processing / state.ALERTS, key, alerts_config)
    return changed


def sweep(
    layout: state.Layout, workdir: Path, count: int, alerts_config: dict[str, Any] | None
) -> dict[str, list[str]]:
    """Check the next `count` cases of the scan folder (in name order, wrapping around)."""
    names = [e.name for e in state.case_dirs(layout.scan_dir) if state.CASE_ID_PATTERN.match(e.name)]
    if not names or count <= 0:
        return {}
    cursor_path = workdir / CURSOR
    start = int((state.read_json(cursor_path) or {}).get("next", 0)) % len(names)
    chosen = [names[(start + i) % len(names)] for i in range(min(count, len(names)))]
    write_json_atomic(cursor_path, {"next": (start + len(chosen)) % len(names)})
    return {case: changed for case in chosen if (changed := verify_case(layout, case, alerts_config))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.verify",
        description="Check finished cases' input files against what intake recorded (`bin/mqi verify`).",
    )
    parser.add_argument("cases", nargs="*", help="case ids (default: --sweep)")
    parser.add_argument("--sweep", type=int, metavar="N", help="check the next N cases in turn (the timer's runner)")
    parser.add_argument("--all", action="store_true", help="check every case")
    settings.add_site_arguments(parser)
    args = parser.parse_args(argv)
    try:
        workdir, config, layout = state.open_site(args)
        if args.cases or args.all:
            names = args.cases or [e.name for e in state.case_dirs(layout.scan_dir)]
            found = {case: changed for case in names if (changed := verify_case(layout, case, config["alerts"]))}
        else:
            count = args.sweep if args.sweep is not None else config["application"]["verify_finished_per_run"]
            found = sweep(layout, workdir, count, config["alerts"])
    except (OSError, ValueError) as exc:
        print(f"bin/mqi verify: {exc}", file=sys.stderr)
        return 2
    for case, changed in found.items():
        print(f"case {case}: input changed after it finished: {', '.join(changed)} (bin/mqi reprocess {case})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""A case's state, kept in the case's own processing folder: the files are the truth.

    <processing>/case_summary.json   the case finished; it is final (never a target again)
    <processing>/state/failed.json   the last failure: step, reason, log, attempts, its kind
    <processing>/state/running.json  jobs of the case the current run has started (the run recorder)
    <processing>/state/retry         someone asked for a retry (`bin/mqi retry CASE`)
    <processing>/state/changed.json  a finished case's input files changed after it finished

No central database: a case folder can be archived or moved together with its record. Deciding
which cases enter a run costs a directory listing plus one `stat` per finished case, whatever
the number of finished cases (`targets`).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.errors import KINDS, PERMANENT, SOFTWARE, TRANSIENT, WAITING
from mqi_communicator.files import read_json_object as read_json  # the name the ops modules read state by
from mqi_communicator.intake.case_inputs import is_ready, stat_fingerprint
from mqi_communicator.intake.fraction_watch import needs_scan

CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
SUMMARY = "case_summary.json"
FAILED = "state/failed.json"
RUNNING = "state/running.json"
RETRY = "state/retry"
CHANGED = "state/changed.json"
ALERTS = "state/alerts.json"
FRACTION_STEP = "fraction_check"  # the rule that writes fraction records (docs/fractions.md)


@dataclass(frozen=True)
class Layout:
    """Where a case's folders are, from the workflow configuration."""

    scan_dir: Path
    processing_template: str
    raw_template: str
    dicom_template: str
    ready_marker: str
    ready_quiet_seconds: float
    max_attempts: int
    logs_dir: Path = Path("logs")

    @classmethod
    def from_config(cls, config: dict[str, Any], workdir: Path | None = None) -> Layout:
        local = config["paths"]["local"]
        app = config["application"]
        base = workdir or Path.cwd()
        return cls(
            scan_dir=base / local["scan_directory"],
            processing_template=str(base / local["processing_directory"]),
            raw_template=str(base / local["raw_output_directory"]),
            dicom_template=str(base / local["final_dicom_directory"]),
            ready_marker=app["ready_marker"],
            ready_quiet_seconds=float(app["ready_quiet_seconds"]),
            max_attempts=int(app["max_attempts"]),
            logs_dir=base / "logs",
        )

    def processing(self, case_id: str) -> Path:
        return Path(self.processing_template.replace("{case_id}", case_id))

    def output_dirs(self, case_id: str) -> list[Path]:
        """Every folder the pipeline writes for a case (reprocessing moves them aside together)."""
        dirs = [Path(t.replace("{case_id}", case_id)) for t in (self.processing_template, self.raw_template)]
        dirs.append(Path(self.dicom_template.replace("{case_id}", case_id)))
        dirs.append(self.logs_dir / case_id)
        unique: list[Path] = []
        for d in dirs:
            # Nested templates (raw inside processing, ...) move with their parent.
            if not any(d == u or u in d.parents for u in unique):
                unique = [u for u in unique if d not in u.parents] + [d]
        return unique


@dataclass
class Failure:
    """What `state/failed.json` holds."""

    step: str
    reason: str
    log: str
    time: float
    attempts: int
    transient: bool
    fingerprint: str
    beam: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # waiting / transient / permanent / software (docs/failures.md). Records written before it
    # existed have only `transient`: `kind_of` reads them as transient or permanent.
    kind: str = ""

    @classmethod
    def read(cls, path: Path) -> Failure | None:
        data = read_json(path)
        if data is None:
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:
            return None

    @property
    def kind_of(self) -> str:
        if self.kind in KINDS:
            return self.kind
        return TRANSIENT if self.transient else PERMANENT


def retry_decision(layout: Layout, case_dir: Path, failure: Failure) -> tuple[bool, str]:
    """Whether a failed case runs again now, and why (or why not)."""
    processing = layout.processing(case_dir.name)
    if (processing / RETRY).exists():
        return True, "a retry was requested"
    if stat_fingerprint(case_dir) != failure.fingerprint:
        return True, "a file of the case changed since it failed"
    kind = failure.kind_of
    if kind == WAITING:  # bounded: past application.delivery_wait_seconds intake fails it for good
        return True, "still waiting for its deliveries"
    if kind in (TRANSIENT, SOFTWARE) and failure.attempts < layout.max_attempts:
        what = "software fault" if kind == SOFTWARE else "transient failure"
        return True, f"{what}, attempt {failure.attempts + 1} of {layout.max_attempts}"
    if kind in (TRANSIENT, SOFTWARE):
        return False, f"failed {failure.attempts} times (application.max_attempts); waiting for a change or a retry"
    return False, "waits for a change of the case or `bin/mqi retry`"


def case_dirs(scan_dir: Path) -> Iterator[os.DirEntry[str]]:
    """The scan folder's sub-folders, in name order."""
    with os.scandir(scan_dir) as entries:
        dirs = [e for e in entries if e.is_dir(follow_symlinks=True)]
    return iter(sorted(dirs, key=lambda e: e.name))


def targets(layout: Layout, warn: Callable[[str], None]) -> list[str]:
    """Case ids that still need work. A finished case costs one `stat`; only unfinished, ready
    cases are looked at further."""
    if not layout.scan_dir.is_dir():
        raise ValueError(f"paths.local.scan_directory {layout.scan_dir} does not exist or is not a folder")
    chosen = []
    for entry in case_dirs(layout.scan_dir):
        case_id = entry.name
        if not CASE_ID_PATTERN.match(case_id):
            warn(f"skipping {entry.path}: case folder names must match [A-Za-z0-9._-]+")
            continue
        processing = layout.processing(case_id)
        if (processing / SUMMARY).exists():
            continue
        case_dir = Path(entry.path)
        if not is_ready(case_dir, layout.ready_marker, layout.ready_quiet_seconds):
            continue
        failure = Failure.read(processing / FAILED)
        if failure is not None:
            again, why = retry_decision(layout, case_dir, failure)
            if not again:
                warn(
                    f"skipping case {case_id}: {failure.step} {why} ({headline(failure.reason, case_dir)}; log {failure.log})"
                )
                continue
            warn(f"retrying case {case_id}: {why}")
        chosen.append(case_id)
    return chosen


def finished_with_new_deliveries(layout: Layout, warn: Callable[[str], None]) -> list[str]:
    """Finished cases in whose folder a delivery folder may have arrived since their last fraction
    record: a stat of the record stamp and one of the case folder per case (needs_scan), so the
    cost stays that of `targets`. A failed record waits for a change or a retry like any failure."""
    chosen = []
    for entry in case_dirs(layout.scan_dir):
        if not CASE_ID_PATTERN.match(entry.name):
            continue
        processing, case_dir = layout.processing(entry.name), Path(entry.path)
        if not needs_scan(case_dir, processing) or not (processing / SUMMARY).exists():
            continue
        failure = Failure.read(processing / FAILED)
        if failure is not None and failure.step == FRACTION_STEP:
            again, why = retry_decision(layout, case_dir, failure)
            if not again:
                warn(f"skipping the new fractions of case {entry.name}: {why} ({headline(failure.reason, case_dir)})")
                continue
        chosen.append(entry.name)
    return chosen


def finished(layout: Layout) -> list[str]:
    """Case ids that finished (for the report, which shows them all)."""
    return [
        entry.name
        for entry in case_dirs(layout.scan_dir)
        if CASE_ID_PATTERN.match(entry.name) and (layout.processing(entry.name) / SUMMARY).exists()
    ]


def summary_verdict(summary: dict[str, Any]) -> str:
    """A finished case's QA verdict as shown (`PASS`, `FAIL [FLAGGED]`): a plan-based or flagged
    result says so wherever it is shown (intake's labels)."""
    qa = summary.get("qa")
    qa = qa if isinstance(qa, dict) else {}
    verdict = str(summary.get("verdict") or qa.get("verdict") or "")
    labels = summary.get("labels") or (["PLAN-BASED"] if summary.get("mode") == "plan" else [])
    return " ".join([verdict, *(f"[{label}]" for label in labels)]).strip()


def headline(reason: str, case_dir: Path | None = None) -> str:
    """The line of a failure reason that says what is wrong: the first that is not a heading
    ("... 2 problem(s):"), without the case folder's path in front of its files."""
    lines = [line.strip().lstrip("-").strip() for line in reason.splitlines() if line.strip()]
    chosen = next((line for line in lines if not line.endswith(":")), lines[0] if lines else "")
    if case_dir is not None:
        chosen = chosen.replace(f"{case_dir}/", "").replace(f"{case_dir}: ", "")
    return chosen


def open_site(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Layout]:
    """An operator command's work folder, site config and case layout, from its `--workdir`
    and `--configfile` (settings.add_site_arguments)."""
    workdir = args.workdir.resolve()
    config = settings.load_site(args.configfile, workdir)
    return workdir, config, Layout.from_config(config, workdir)

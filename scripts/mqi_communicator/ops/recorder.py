"""The run recorder: turns Snakemake's job events into each case's state files and alerts.

Snakemake hands every log record to the `mqi` logger plugin (scripts/snakemake_logger_plugin_mqi,
enabled by the workflow profile), which passes it here. The Snakefile tells this module where the
case state lives (`configure`), since both run in the same process. Records arrive one at a time
on the plugin's own thread, so nothing here needs a lock; a failure to write state or to send an
alert is printed and never stops the run.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sys
import time
from dataclasses import asdict
from logging import LogRecord
from pathlib import Path
from typing import Any

from mqi_communicator import cli
from mqi_communicator.dicomnet import outbox
from mqi_communicator.errors import KINDS, PERMANENT, SOFTWARE, TRANSIENT, WAITING
from mqi_communicator.files import write_json_atomic
from mqi_communicator.intake import fraction_watch
from mqi_communicator.intake.case_inputs import stat_fingerprint
from mqi_communicator.ops import alerts, fraction_alerts, overview, retention, state, verdict_alerts, verify

_CONFIG: dict[str, Any] | None = None
_WORKDIR: Path | None = None
# Finished cases whose folder changed without a fraction to record (common.smk): their stamp is
# brought up to date when a run starts, never by a dry run, so they are not read again each run.
_SEEN_LATER: list[tuple[Path, fraction_watch.Seen]] = []
# The cases this run's DAG was built for (common.smk, `plan`): written when the run starts, so
# status tells a case this run takes from one the next run takes (docs/operations.md#during-a-run).
_PLANNED: list[str] = []

# Only for a step that never said what kind its failure is (no `mqi-failure` marker in its log,
# mqi_communicator.cli): what the scheduler, the kernel or the network print when our process was
# killed or never ran, and the remote job's own lines (docs/failures.md#without-a-marker).
TRANSIENT_PATTERNS = re.compile(
    r"unreachable|connection (?:refused|reset|timed out)|timed? ?out|temporar|NODE_FAIL|PREEMPTED|"
    r"BOOT_FAIL|CANCELLED|slurmstepd: error|Broken pipe|No route to host|Resource temporarily unavailable|"
    r"Name or service not known|killed by signal|OUT_OF_ME",
    re.IGNORECASE,
)
TRACEBACK = "Traceback (most recent call last):"
SLURM_SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
FINAL_RULE = "case_summary"
JOBS_FAILED = "At least one job did not complete successfully"


def configure(config: dict[str, Any], workdir: Path | None = None) -> None:
    """Called by the Snakefile: the configuration the run recorder works from."""
    global _CONFIG, _WORKDIR
    _CONFIG, _WORKDIR = config, (workdir or Path.cwd()).resolve()


def remember_seen(processing: Path, seen: fraction_watch.Seen) -> None:
    """Called by the Snakefile: this finished case's folder, as scanned, has nothing to record."""
    _SEEN_LATER.append((processing, seen))


def plan(case_ids: list[str]) -> None:
    """Called by the Snakefile: the cases this run's DAG is built for (its targets)."""
    _PLANNED[:] = sorted(set(case_ids))


def last_run_path(workdir: Path) -> Path:
    return workdir / ".mqi" / "last_run.json"


def run_plan_path(workdir: Path) -> Path:
    """The case ids of the last run that started, beside last_run.json and written once, so that
    the record rewritten at each job's end stays small whatever the number of cases."""
    return workdir / ".mqi" / "run_plan.json"


def _log_texts(log_paths: list[str]) -> list[str]:
    texts = []
    for log in log_paths:
        try:
            texts.append(Path(log).read_text(errors="replace"))
        except OSError:
            continue
    return texts


def failure_reason(log_paths: list[str], fallback: str) -> str:
    """The lines of a step's log that say what went wrong (the steps print `... FAILED ...: why`)."""
    for text in _log_texts(log_paths):
        lines = [line.rstrip() for line in text.splitlines() if line.strip() and not cli.is_marker(line)]
        # After a traceback (a software fault) the step's own FAILED line says it shortest.
        said = [i for i, line in enumerate(lines) if TRACEBACK in text and " FAILED" in line]
        marked = said or [i for i, line in enumerate(lines) if re.search(r"FAILED|Error|error:|ERROR", line)]
        if marked:
            return "\n".join(lines[marked[0] : marked[0] + 8])
        if lines:
            return "\n".join(lines[-5:])
    return fallback


def failure_kind(log_paths: list[str], reason: str) -> str:
    """waiting / transient / permanent / software: what the step's marker says; without one, a
    job that left no log is transient, a Python traceback a software fault, the scheduler's and
    the network's words transient, anything else permanent (docs/failures.md)."""
    texts = _log_texts(log_paths)
    if not texts:
        return TRANSIENT
    for text in texts:
        marker = cli.read_marker(text)
        if marker is not None and marker["kind"] in KINDS:
            return str(marker["kind"])
    if TRANSIENT_PATTERNS.search(reason):
        return TRANSIENT
    if any(TRACEBACK in text for text in texts):
        return SOFTWARE
    return PERMANENT


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _field(record: LogRecord, name: str) -> Any:
    """A field Snakemake attached to the record (`extra=`)."""
    return getattr(record, name, None)


class RunRecorder:
    """One Snakemake run: which job belongs to which case, what started, failed and finished."""

    def __init__(self, dryrun: bool) -> None:
        self.dryrun = dryrun
        self.jobs: dict[int, dict[str, Any]] = {}
        self.started = time.time()
        self.failed_jobs = 0
        self.done_jobs = 0
        self.errors: list[str] = []
        self.failed_cases: set[str] = set()
        self.announced = False

    # -- plumbing ---------------------------------------------------------------------------
    @functools.cached_property
    def layout(self) -> state.Layout | None:
        # Asked for only once records arrive, by when the Snakefile has called `configure`.
        return state.Layout.from_config(_CONFIG, _WORKDIR) if _CONFIG is not None else None

    def handle(self, record: LogRecord) -> None:
        if self.dryrun or _CONFIG is None:
            return
        try:
            self._handle(record)
        except Exception as exc:  # the record keeper must never take the run down
            print(f"mqi run recorder: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _handle(self, record: LogRecord) -> None:
        event = str(getattr(record, "event", "") or "")
        if not self.announced:
            # A run starts executing jobs here; `--report`, `--lint` and the like never do.
            if event != "workflow_started":
                return
            self.announced = True
            self._write_run_plan()
            self._write_last_run("running")
            self._verify_finished_cases()
            self._prune_finished_cases()
            for processing, seen in _SEEN_LATER:
                fraction_watch.write_seen(processing, seen)
        if event == "job_info":
            self._job_started(record)
        elif event == "job_finished":
            self._job_finished(int(_field(record, "job_id")))
        elif event == "job_error":
            self._job_failed(record)
        elif event == "error":
            message = record.getMessage().strip()
            # A failed job's own exception and Snakemake's closing words about it are the job's
            # failure (recorded per case), not the run's.
            if "CalledProcessError" in f"{message} {_field(record, 'exception')}" or JOBS_FAILED in message:
                return
            self.errors.append(message.splitlines()[0] if message else "error")
        else:
            submitted = SLURM_SUBMITTED.search(record.getMessage())
            if submitted:
                self._slurm_submitted(int(submitted.group(1)), submitted.group(2))

    def close(self) -> None:
        if self.dryrun or _CONFIG is None or not self.announced:
            return
        for jobid in list(self.jobs):
            self._forget(jobid)
        try:
            # With retention.intermediates_days 0, the cases this run finished (docs/retention.md).
            self._prune_finished_cases()
        except Exception as exc:  # the record keeper must never take the run down
            print(f"mqi run recorder: {type(exc).__name__}: {exc}", file=sys.stderr)
        # Failed jobs alone are the cases' failures (alerted per case); an error is the run's own.
        status = "failed" if self.errors else "cases_failed" if self.failed_jobs else "ok"
        self._write_last_run(status)
        if _WORKDIR is not None:
            outbox.start_sender(_CONFIG, _WORKDIR)
            # The overview page shows this run's cases (docs/overview-page.md); it never fails the run.
            overview.regenerate_after_run(_CONFIG, _WORKDIR)

    def _verify_finished_cases(self) -> None:
        """A few finished cases per run are checked for inputs changed after finishing (verify), and
        the QA verdict alerts no channel took earlier are tried again (verdict_alerts)."""
        layout = self.layout
        assert layout is not None and _CONFIG is not None and _WORKDIR is not None
        count = _CONFIG["application"]["verify_finished_per_run"]
        for case_id, changed in verify.sweep(layout, _WORKDIR, count, _CONFIG["alerts"]).items():
            print(f"mqi: finished case {case_id} changed since: {', '.join(changed)}", file=sys.stderr)
        for case_id in verdict_alerts.retry_pending(layout, _WORKDIR, _CONFIG["alerts"]):
            print(f"mqi: QA verdict alert of case {case_id} sent (not delivered before)", file=sys.stderr)
        # RT Doses not yet confirmed by a DICOM destination: tried again (docs/dicom-network.md#sender).
        outbox.start_sender(_CONFIG, _WORKDIR)

    def _prune_finished_cases(self) -> None:
        """Finished cases whose retention is due lose their regenerable intermediates; the queue
        says which, so the cost does not grow with the number of finished cases (ops.retention)."""
        layout = self.layout
        assert layout is not None and _CONFIG is not None and _WORKDIR is not None
        days = retention.retention_days(_CONFIG)
        pruned = retention.prune_due(layout, _WORKDIR, days, say=_say, limit=retention.PER_RUN)
        for case_id, freed in pruned.items():
            _say(f"mqi: finished case {case_id}: intermediates removed ({freed / 1e6:.1f} MB); its record is kept")

    # -- events -----------------------------------------------------------------------------
    def _job_started(self, record: LogRecord) -> None:
        wildcards = dict(getattr(record, "wildcards", {}) or {})
        job = {
            "rule": _field(record, "rule_name"),
            "case_id": wildcards.get("case_id"),
            "beam": wildcards.get("beam"),
            "fraction": wildcards.get("fraction"),
            "log": list(getattr(record, "log", []) or []),
            "started": time.time(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        self.jobs[int(_field(record, "jobid"))] = job
        if job["case_id"]:
            self._update_running(job["case_id"], lambda running: running.__setitem__(str(_field(record, "jobid")), job))

    def _slurm_submitted(self, jobid: int, slurm_job: str) -> None:
        job = self.jobs.get(jobid)
        if job and job["case_id"]:
            job["slurm_job"] = slurm_job
            self._update_running(job["case_id"], lambda running: running.__setitem__(str(jobid), job))

    def _job_finished(self, jobid: int) -> None:
        self.done_jobs += 1
        job = self.jobs.get(jobid)
        self._forget(jobid)
        self._write_last_run("running")  # the counts, as jobs end (one small file, not synced)
        if job and job["case_id"] and job["rule"] == FINAL_RULE:
            self._case_finished(job["case_id"])
        if job and job["case_id"] and job["rule"] == state.FRACTION_STEP:
            self._fraction_recorded(job["case_id"], int(job["fraction"]))

    def _job_failed(self, record: LogRecord) -> None:
        self.failed_jobs += 1
        jobid = int(_field(record, "jobid"))
        job = self.jobs.get(jobid) or {"rule": _field(record, "rule_name"), "case_id": None, "beam": None}
        self._forget(jobid)
        self._write_last_run("running")
        wildcards_case = job.get("case_id")
        layout = self.layout
        # One attempt per run: a case's first failure in a run is its record (others follow from it).
        if not wildcards_case or layout is None or wildcards_case in self.failed_cases:
            return
        self.failed_cases.add(wildcards_case)
        logs = list(getattr(record, "log", []) or job.get("log") or [])
        aux = getattr(record, "aux", {}) or {}
        fallback = str(getattr(record, "rule_msg", None) or aux.get("msg") or "the job failed without a log")
        reason = failure_reason(logs, fallback)
        case_dir = layout.scan_dir / wildcards_case
        fingerprint = stat_fingerprint(case_dir) if case_dir.is_dir() else ""
        processing = layout.processing(wildcards_case)
        previous = state.Failure.read(processing / state.FAILED)
        kind = failure_kind(logs, reason)
        attempts = previous.attempts + 1 if previous and previous.fingerprint == fingerprint else 1
        failure = state.Failure(
            step=job["rule"],
            beam=job.get("beam"),
            reason=reason,
            log=logs[0] if logs else "",
            time=time.time(),
            attempts=0 if kind == WAITING else attempts,  # waiting is no attempt: nothing failed
            transient=kind != PERMANENT,  # read by records' older readers: tried again by itself
            fingerprint=fingerprint,
            kind=kind,
        )
        write_json_atomic(processing / state.FAILED, asdict(failure))
        (processing / state.RETRY).unlink(missing_ok=True)
        # Someone is told of a case's own fault and of a bug at once, of a transient failure once
        # the attempts are spent, of a case still waiting never.
        if kind in (PERMANENT, SOFTWARE) or (kind == TRANSIENT and attempts >= layout.max_attempts):
            self._alert_failed(wildcards_case, failure)

    def _case_finished(self, case_id: str) -> None:
        layout = self.layout
        assert layout is not None
        processing = layout.processing(case_id)
        failure = state.Failure.read(processing / state.FAILED)
        for name in (state.FAILED, state.RETRY, state.RUNNING):
            (processing / name).unlink(missing_ok=True)
        if failure is not None:
            self._alert_recovered(case_id)
        assert _CONFIG is not None and _WORKDIR is not None
        retention.enqueue(layout, _WORKDIR, case_id)
        # Every new non-PASS QA verdict reaches someone, once (docs/alerts-and-trend.md).
        verdict_alerts.on_case_finished(case_id, layout, _WORKDIR, _CONFIG["alerts"])
        if _CONFIG["dicom_network"]["sender"]["destinations"]:
            outbox.add(_WORKDIR, case_id)  # its RT Doses go out when the run ends

    # -- files ------------------------------------------------------------------------------
    def _forget(self, jobid: int) -> None:
        job = self.jobs.pop(jobid, None)
        if job and job["case_id"]:
            self._update_running(job["case_id"], lambda running: running.pop(str(jobid), None))

    def _update_running(self, case_id: str, change: Any) -> None:
        layout = self.layout
        assert layout is not None
        path = layout.processing(case_id) / state.RUNNING
        running = (state.read_json(path) or {}).get("jobs", {})
        # Entries of an earlier, killed run are stale: only this run's jobs are running.
        running = {k: v for k, v in running.items() if v.get("pid") == os.getpid()}
        change(running)
        if running:
            write_json_atomic(path, {"jobs": running})
        else:
            path.unlink(missing_ok=True)

    def _write_run_plan(self) -> None:
        assert _WORKDIR is not None
        plan_record = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "cases": _PLANNED}
        write_json_atomic(run_plan_path(_WORKDIR), plan_record)

    def _write_last_run(self, status: str) -> None:
        assert _WORKDIR is not None
        record = {
            "started": self.started,
            "ended": None if status == "running" else time.time(),
            "status": status,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "jobs_done": self.done_jobs,
            "jobs_failed": self.failed_jobs,
            "errors": self.errors[:5],
        }
        write_json_atomic(last_run_path(_WORKDIR), record)

    # -- alerts -----------------------------------------------------------------------------
    def _alert_failed(self, case_id: str, failure: state.Failure) -> None:
        layout = self.layout
        assert layout is not None and _CONFIG is not None
        software = failure.kind_of == SOFTWARE
        alert = alerts.case_failed(case_id, failure.step, failure.reason, failure.log, software=software)
        key = f"failed:{failure.step}:{failure.fingerprint}"
        alerts.notify_once(alert, layout.processing(case_id) / state.ALERTS, key, _CONFIG["alerts"])

    def _fraction_recorded(self, case_id: str, number: int) -> None:
        """A fraction's delivery record is written: alert once when it is not PASS; a finished
        case's earlier failure to record a fraction is over (a new case's ends at its summary)."""
        layout = self.layout
        assert layout is not None and _CONFIG is not None
        processing = layout.processing(case_id)
        fraction_alerts.alert_if_not_pass(processing, case_id, number, _CONFIG["alerts"])
        failure = state.Failure.read(processing / state.FAILED)
        if failure is not None and failure.step == state.FRACTION_STEP and (processing / state.SUMMARY).exists():
            for name in (state.FAILED, state.RETRY):
                (processing / name).unlink(missing_ok=True)

    def _alert_recovered(self, case_id: str) -> None:
        layout = self.layout
        assert layout is not None and _CONFIG is not None
        processing = layout.processing(case_id)
        verdict = verdict_alerts.finished_verdict(processing)
        alert = alerts.case_recovered(case_id, verdict, processing / verdict_alerts.QA_SHEET if verdict else None)
        alerts.resolve(alert, processing / state.ALERTS, "failed:", _CONFIG["alerts"])

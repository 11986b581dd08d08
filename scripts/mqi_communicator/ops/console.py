"""The console's account of a run: per case its step, beams, elapsed time and state, instead of
Snakemake's job-by-job listing (which stays whole in Snakemake's log file, `.snakemake/log/`).

The `mqi` logger plugin hands every Snakemake log record here when it writes the console (a run
that executes jobs; a dry run keeps Snakemake's own listing). Until the workflow starts, records
go to Snakemake's own console handler (`passthrough`), so `--report`, `--lint` and errors in the
configuration read as Snakemake prints them. From then on:

- on a terminal, a rich live table (one row per case: state, step, beams done/total, elapsed)
  under the lines worth keeping (warnings, failures, finished cases);
- elsewhere (cron, systemd, a pipe), one plain line per event, without control codes:
  `12:03:01 case X: simulate beam 2/3 started (2G90)`, `case X finished in 1m12s, QA PASS`,
  `case Y FAILED at interpret: <reason> (log: <path>)` followed by the lines of the log that say
  what went wrong;
- at the end, one paragraph: how many cases finished, failed, wait, and where the full log is.

Warnings (skipped, late, waiting cases) and errors are printed whole, one line each as Snakemake's
logger received them: they are clinical messages. `--logger-mqi-console snakemake` (or the
environment variable SNAKEMAKE_LOGGER_MQI_CONSOLE=snakemake) gives back Snakemake's own console.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import LogRecord
from pathlib import Path
from typing import Any, TextIO

from mqi_communicator.ops import state
from mqi_communicator.ops.recorder import FINAL_RULE, JOBS_FAILED, failure_reason

SIMULATE_RULES = ("simulate", "remote_simulate")
# Steps that follow the one before within seconds: shown in the live table, not given a line.
QUIET_RULES = {
    "moqui_input",
    "stage_out",
    "rtdose_plan",
    "report_dose_map",
    "report_beam_table",
    FINAL_RULE,
    state.FRACTION_STEP,  # its result gets a line of its own when it is written
    "all",
}
# The case warnings of the Snakefile (ops.state.targets, common.smk's waiting_for_deliveries).
SKIPPED = re.compile(r"^skipping case (\S+): (.*)", re.DOTALL)
WAITING = re.compile(r"^case (\S+): (waiting .*)", re.DOTALL)
NOTHING_TO_DO = "Nothing to be done"


def elapsed(seconds: float) -> str:
    """`42s`, `1m12s`, `2h05m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class CaseAccount:
    """One case in this run, in the words of `bin/mqi status`."""

    case_id: str
    noted: str = "queued"  # before its first job: waiting or skipped (the Snakefile's warnings)
    reason: str = ""
    step: str = ""
    beams_total: int | None = None
    beams_done: int = 0
    beams_started: list[str] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    finished: bool = False
    failures: list[str] = field(default_factory=list)  # where its jobs failed (step, beam)
    verdict: str = ""
    steps_shown: set[str] = field(default_factory=set)

    @property
    def state(self) -> str:
        if self.finished:
            return "finished"  # a retried job succeeded
        if self.failures:
            return "failed"
        return "running" if self.started else self.noted

    @property
    def beams(self) -> str:
        return f"{self.beams_done}/{self.beams_total}" if self.beams_total else ""

    def elapsed(self, now: float) -> str:
        return elapsed((self.ended or now) - self.started) if self.started else ""


class RunConsole:
    """Renders one run's log records as the account described above."""

    def __init__(
        self,
        stream: TextIO,
        passthrough: Callable[[LogRecord], None],
        layout: Callable[[], state.Layout | None],
        full_log: Callable[[], str | None],
        terminal: bool | None = None,
    ) -> None:
        from rich.console import Console

        self.stream = stream
        self.passthrough = passthrough
        self.layout = layout
        self.full_log = full_log
        self.console = Console(file=stream, force_terminal=terminal, highlight=False, soft_wrap=True)
        self.terminal = self.console.is_terminal
        self.cases: dict[str, CaseAccount] = {}
        self.jobs: dict[int, tuple[str, str | None, str | None, list[str]]] = {}  # rule, case, beam, logs
        self.started: float | None = None
        self.log_path: str | None = None
        self.nothing_to_do = False
        self.closed = False
        self.failed_other: list[str] = []
        self.fraction_checks: list[str] = []  # "case n VERDICT" per fraction record not PASS
        self.progress: Any = None
        self.overall: Any = None
        self.rows: dict[str, Any] = {}

    # -- records ----------------------------------------------------------------------------
    def handle(self, record: LogRecord) -> None:
        event = str(getattr(record, "event", "") or "")
        if record.levelno == logging.WARNING:
            self._note_case_warning(record.getMessage())
        if self.started is None:
            if event != "workflow_started":
                self.passthrough(record)
                return
            self._start()
            return
        if event == "job_info":
            self._job_started(record)
        elif event == "job_finished":
            self._job_finished(int(getattr(record, "job_id", -1)))
        elif event == "job_error":
            self._job_failed(record)
        elif event == "progress" and self.progress is not None:
            self.progress.update(self.overall, completed=record.done, total=record.total)  # type: ignore[attr-defined]
        elif event == "run_info" and self.progress is not None:
            total = (getattr(record, "stats", None) or {}).get("total")
            self.progress.update(self.overall, total=total)
        elif record.levelno >= logging.WARNING and event not in ("job_error", "group_error"):
            message = record.getMessage().strip()
            # A failed job's exception repeats its shell command; the job's failure was shown.
            if "CalledProcessError" in f"{message} {getattr(record, 'exception', '')}" or JOBS_FAILED in message:
                return
            if record.levelno >= logging.ERROR and "Exiting because a job execution failed" in message:
                return
            self._line(message, style="yellow" if record.levelno == logging.WARNING else "bold red")
        elif not event and NOTHING_TO_DO in record.getMessage():
            self.nothing_to_do = True
            self._line(record.getMessage().strip())

    def _note_case_warning(self, message: str) -> None:
        for pattern, case_state in ((SKIPPED, "skipped"), (WAITING, "waiting")):
            match = pattern.match(message)
            if match:
                account = self.cases.setdefault(match.group(1), CaseAccount(match.group(1)))
                account.noted, account.reason = case_state, match.group(2).splitlines()[0]

    def _start(self) -> None:
        self.started = time.time()
        self.log_path = self.full_log()
        where = f"Snakemake's full log: {self.log_path}" if self.log_path else "Snakemake writes no log file"
        self._line(f"mqi: run started at {time.strftime('%Y-%m-%d %H:%M:%S')}; {where}")
        if self.terminal:
            from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
            from rich.text import Text

            class Elapsed(ProgressColumn):
                """Since the case's first job, until it finished or failed (not its last beam)."""

                def render(self, task: Task) -> Text:
                    return Text(elapsed(task.elapsed or 0), style="progress.elapsed")

            self.progress = Progress(
                TextColumn("{task.description}"),
                TextColumn("{task.fields[state]}"),
                TextColumn("{task.fields[step]}"),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[beams]}"),
                Elapsed(),
                console=self.console,
                transient=False,
            )
            self.overall = self.progress.add_task("all steps", total=None, state="", step="", beams="")
            self.progress.start()

    def _account(self, case_id: str) -> CaseAccount:
        account = self.cases.setdefault(case_id, CaseAccount(case_id))
        if account.started is None:
            account.started = time.time()
        return account

    def _beams_total(self, case_id: str) -> int | None:
        layout = self.layout()
        if layout is None:
            return None
        intake = state.read_json(layout.processing(case_id) / "intake.json") or {}
        beams = intake.get("beams")
        return len(beams) if isinstance(beams, list) else None

    def _job_started(self, record: LogRecord) -> None:
        wildcards = dict(getattr(record, "wildcards", {}) or {})
        rule = str(getattr(record, "rule_name", "") or "")
        case_id, beam = wildcards.get("case_id"), wildcards.get("beam")
        self.jobs[int(getattr(record, "jobid", -1))] = (rule, case_id, beam, list(getattr(record, "log", []) or []))
        if not case_id:
            return
        account = self._account(case_id)
        account.step = f"{rule} {beam}" if beam and rule in SIMULATE_RULES else rule
        if rule in SIMULATE_RULES:
            if account.beams_total is None:
                account.beams_total = self._beams_total(case_id)
            if beam in account.beams_started:  # Snakemake retries a failed job (profile `retries`)
                self._event(f"case {case_id}: {rule} beam {beam} started again")
            else:
                account.beams_started.append(str(beam))
                of = f"/{account.beams_total}" if account.beams_total else ""
                self._event(f"case {case_id}: {rule} beam {len(account.beams_started)}{of} started ({beam})")
        elif rule not in QUIET_RULES and rule not in account.steps_shown:
            account.steps_shown.add(rule)
            self._event(f"case {case_id}: {rule} started")
        self._show(account)

    def _job_finished(self, jobid: int) -> None:
        rule, case_id, _, logs = self.jobs.pop(jobid, ("", None, None, []))
        if not case_id:
            return
        account = self._account(case_id)
        if rule in SIMULATE_RULES:
            account.beams_done += 1
        if rule == state.FRACTION_STEP:
            self._fraction_checked(account, logs)
        if rule == FINAL_RULE:
            account.finished, account.ended, account.step = True, time.time(), ""
            layout = self.layout()
            summary = state.read_json(layout.processing(case_id) / state.SUMMARY) if layout else None
            account.verdict = state.summary_verdict(summary or {})
            qa = f", QA {account.verdict}" if account.verdict else ""
            self._line(f"case {case_id} finished in {account.elapsed(account.ended)}{qa}", style="green")
        self._show(account)

    def _fraction_checked(self, account: CaseAccount, logs: list[str]) -> None:
        """A fraction's delivery record was written (docs/fractions.md): its verdict line, from the
        step's log (`case X fraction N: VERDICT`, then one line per beam)."""
        try:
            lines = Path(logs[0]).read_text(errors="replace").splitlines() if logs else []
        except OSError:
            lines = []
        found = next(
            (re.match(r"case (\S+) fraction (\d+): (.+)", line) for line in lines if " fraction " in line), None
        )
        if found is None:
            return
        number, verdict = found.group(2), found.group(3).strip()
        if verdict != "PASS":
            self.fraction_checks.append(f"{account.case_id} {number} {verdict}")
        self._line(
            f"case {account.case_id}: fraction {number} delivery check {verdict}",
            "green" if verdict == "PASS" else "bold red",
        )
        layout = self.layout()
        if layout is not None and (layout.processing(account.case_id) / state.SUMMARY).exists():
            # A later fraction of a finished case: that case is done again.
            account.finished, account.ended, account.step = True, time.time(), ""

    def _job_failed(self, record: LogRecord) -> None:
        jobid = int(getattr(record, "jobid", -1))
        rule, case_id, beam, logs = self.jobs.pop(jobid, (str(getattr(record, "rule_name", "")), None, None, []))
        logs = list(getattr(record, "log", []) or logs)
        reason_lines = failure_reason(logs, str(getattr(record, "rule_msg", None) or "the job failed without a log"))
        reason = reason_lines.splitlines()
        where = f"{rule} beam {beam}" if beam else rule
        log = f" (log: {logs[0]})" if logs else ""
        layout = self.layout()
        case_dir = layout.scan_dir / case_id if layout and case_id else None
        headline = state.headline(reason_lines, case_dir) or "no reason given"
        if case_id:
            account = self._account(case_id)
            again = where in account.failures
            account.failures.append(where)
            account.ended, account.step = time.time(), where
            self._show(account)
            if again:  # a retry that failed the same way: the first failure showed the log
                self._line(f"case {case_id} FAILED again at {where}: {headline}", style="bold red")
                return
            self._line(f"case {case_id} FAILED at {where}: {headline}{log}", style="bold red")
        else:
            self.failed_other.append(f"{where}: {headline}")
            self._line(f"{where} FAILED: {headline}{log}", style="bold red")
        for line in reason:
            self._line(f"    {line}")

    # -- output -----------------------------------------------------------------------------
    def _line(self, text: str, style: str = "") -> None:
        """A line kept on the console (above the live table on a terminal)."""
        if self.terminal:
            from rich.text import Text

            self.console.print(Text(text, style=style))
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _event(self, text: str) -> None:
        """A step of a case: a timed line in plain text; on a terminal the live table shows it."""
        if not self.terminal:
            self._line(f"{time.strftime('%H:%M:%S')} {text}")

    def _show(self, account: CaseAccount) -> None:
        if self.progress is None:
            return
        fields = {"state": account.state, "step": account.step, "beams": account.beams}
        total = account.beams_total or None
        if account.case_id not in self.rows:
            self.rows[account.case_id] = self.progress.add_task(account.case_id, total=total, **fields)
        task = self.rows[account.case_id]
        self.progress.update(task, total=total, completed=account.beams_done, **fields)
        if account.state in ("finished", "failed"):
            self.progress.stop_task(task)

    def close(self) -> None:
        if self.started is None or self.closed:
            return  # (Snakemake closes its handlers, and logging closes them again at exit)
        self.closed = True
        if self.progress is not None:
            self.progress.stop()
        self._line(self.summary(time.time()))

    def summary(self, now: float) -> str:
        assert self.started is not None
        counts: dict[str, list[str]] = {}
        for account in self.cases.values():
            counts.setdefault(account.state, []).append(account.case_id)
        parts = []
        for name, label in (("finished", "finished"), ("failed", "failed"), ("running", "unfinished")):
            if counts.get(name):
                parts.append(f"{len(counts[name])} {label}")
                if name == "failed":
                    parts[-1] += f" ({', '.join(f'{c} at {self.cases[c].failures[0]}' for c in sorted(counts[name]))})"
        if counts.get("waiting"):
            parts.append(f"{len(counts['waiting'])} waiting ({', '.join(sorted(counts['waiting']))})")
        if counts.get("skipped"):
            parts.append(f"{len(counts['skipped'])} skipped after an earlier failure (bin/mqi status)")
        if self.fraction_checks:  # (each one's line said PASS already)
            parts.append(f"fraction checks not PASS: {', '.join(self.fraction_checks)}")
        if self.failed_other:
            parts.append(f"also failed: {'; '.join(self.failed_other)}")
        ran = ", ".join(parts) if parts else ("nothing to do" if self.nothing_to_do else "no case ran")
        where = f" Snakemake's full log: {self.log_path}" if self.log_path else ""
        return f"mqi: run ended after {elapsed(now - self.started)}: {ran}.{where}"


def snakemake_log_file(handlers: list[logging.Handler]) -> str | None:
    """The file Snakemake writes its complete log to (its handler `DefaultLogFileHandler`)."""
    for handler in handlers:
        if isinstance(handler, logging.FileHandler) and handler.name == "DefaultLogFileHandler":
            return str(Path(handler.baseFilename))
    return None

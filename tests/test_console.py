"""The console's account of a run (ops/console.py), fed the log records Snakemake's logger sends
the `mqi` plugin (same events and fields); real runs are checked in tests/test_workflow_p2.py."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from mqi_communicator.ops import console, state
from snakemake_logger_plugin_mqi import LogHandler, LogHandlerSettings


def record(msg: str | None = None, level: int = logging.INFO, **fields: object) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": msg, "levelno": level, "levelname": logging.getLevelName(level), **fields})


def job_info(jobid: int, rule: str, case_id: str, beam: str | None = None, log: str = "") -> logging.LogRecord:
    wildcards = {"case_id": case_id, **({"beam": beam} if beam else {})}
    return record(event="job_info", jobid=jobid, rule_name=rule, wildcards=wildcards, log=[log] if log else [])


@pytest.fixture
def layout(tmp_path: Path) -> state.Layout:
    return state.Layout(
        scan_dir=tmp_path / "scan",
        processing_template=str(tmp_path / "data" / "{case_id}"),
        raw_template=str(tmp_path / "data" / "{case_id}" / "raw"),
        dicom_template=str(tmp_path / "data" / "{case_id}" / "dicom"),
        ready_marker="_CASE_READY",
        ready_quiet_seconds=0.0,
        max_attempts=3,
        logs_dir=tmp_path / "logs",
    )


def make(layout: state.Layout, terminal: bool = False) -> tuple[console.RunConsole, io.StringIO, list[str]]:
    stream = io.StringIO()
    passed: list[str] = []
    run = console.RunConsole(
        stream,
        passthrough=lambda r: passed.append(r.getMessage()),
        layout=lambda: layout,
        full_log=lambda: "/work/.snakemake/log/run.snakemake.log",
        terminal=terminal,
    )
    return run, stream, passed


def test_plain_account_of_a_finished_case(layout: state.Layout) -> None:
    case = layout.processing("c1")
    case.mkdir(parents=True)
    (case / "intake.json").write_text(json.dumps({"beams": [{"name": "B1"}, {"name": "B2"}, {"name": "B3"}]}))
    run, stream, passed = make(layout)
    # Before the workflow starts, records go to Snakemake's own console (--report, config errors).
    run.handle(record("skipping case old: simulate waits for a change of the case", logging.WARNING))
    run.handle(record("Building DAG of jobs..."))
    assert passed == ["skipping case old: simulate waits for a change of the case", "Building DAG of jobs..."]
    run.handle(record("Workflow has started!", event="workflow_started"))
    run.handle(record("Job stats: ...", event="run_info", stats={"total": 9}))
    run.handle(job_info(1, "intake", "c1"))
    run.handle(record(event="shellcmd", cmd="python -m mqi_communicator.intake --settings '{\"rooms\": {}}'"))
    run.handle(record(event="job_finished", job_id=1))
    run.handle(job_info(2, "moqui_input", "c1", "B1"))  # a quiet step: no line of its own
    run.handle(job_info(3, "simulate", "c1", "B2"))
    run.handle(record(event="progress", done=3, total=9))
    run.handle(record(event="job_finished", job_id=3))
    (case / state.SUMMARY).write_text(json.dumps({"qa": {"verdict": "PASS"}, "labels": ["FLAGGED"]}))
    run.handle(job_info(4, "case_summary", "c1"))
    run.handle(record(event="job_finished", job_id=4))
    run.close()
    run.close()  # Snakemake closes its handlers, and logging once more at exit: one summary
    assert len(passed) == 2
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("mqi: run started at ")
    assert lines[0].endswith("; Snakemake's full log: /work/.snakemake/log/run.snakemake.log")
    assert lines[1].endswith(" case c1: intake started")
    assert lines[2].endswith(" case c1: simulate beam 1/3 started (B2)")
    assert lines[3] == "case c1 finished in 0s, QA PASS [FLAGGED]"
    assert lines[4].startswith("mqi: run ended after 0s: 1 finished, 1 skipped after an earlier failure")
    assert lines[4].endswith(" Snakemake's full log: /work/.snakemake/log/run.snakemake.log")
    assert len(lines) == 5 and "\x1b" not in stream.getvalue()  # cron and systemd logs: no control codes


def test_failure_names_case_step_reason_and_log(layout: state.Layout, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "c2" / "intake.log"
    log.parent.mkdir(parents=True)
    folder = layout.scan_dir / "c2"
    log.write_text(
        "reading the plan\n"
        f"INTAKE FAILED for case c2: {folder}: 1 problem(s):\n"
        f"  - {folder}/20260101: 3 PTN files for 4 delivered layers\n"
    )
    run, stream, _ = make(layout)
    run.handle(record("Workflow has started!", event="workflow_started"))
    run.handle(record("case late: waiting for deliveries of beam 3 ('2G90')", logging.WARNING))
    run.handle(job_info(5, "intake", "c2", log=str(log)))
    run.handle(record("Error in rule intake", logging.ERROR, event="job_error", jobid=5, rule_name="intake"))
    # Snakemake's own words about the failed job repeat its shell command: they stay in its log.
    run.handle(record("RuleException:\nCalledProcessError in file intake.smk:\nCommand 'python ...'", logging.ERROR))
    run.handle(record("Exiting because a job execution failed. Look below for error messages", logging.ERROR))
    run.handle(record("WorkflowError:\nAt least one job did not complete successfully.", logging.ERROR))
    run.handle(record("MissingInputException: a file is missing", logging.ERROR, event="error"))
    run.close()
    lines = stream.getvalue().splitlines()
    assert lines[1] == "case late: waiting for deliveries of beam 3 ('2G90')"  # clinical: whole, on one line
    assert lines[3] == f"case c2 FAILED at intake: 20260101: 3 PTN files for 4 delivered layers (log: {log})"
    assert lines[4] == f"    INTAKE FAILED for case c2: {folder}: 1 problem(s):"  # the log's own lines follow
    assert lines[6] == "MissingInputException: a file is missing"
    assert "mqi: run ended after 0s: 1 failed (c2 at intake), 1 waiting (late)." in lines[7]
    assert len(lines) == 8


def test_a_retried_job_is_told_once_and_can_still_finish(layout: state.Layout, tmp_path: Path) -> None:
    log = tmp_path / "simulate_B1.log"
    log.write_text("SIMULATION FAILED for moqui_tps_B1.in: engine exited with 3\n")
    run, stream, _ = make(layout)
    run.handle(record("Workflow has started!", event="workflow_started"))
    for jobid in (7, 8):  # the hpc profile's `retries`: Snakemake starts the failed job again
        run.handle(job_info(jobid, "simulate", "c4", "B1", log=str(log)))
        run.handle(record("Error in rule simulate", logging.ERROR, event="job_error", jobid=jobid))
    run.handle(job_info(9, "simulate", "c4", "B1", log=str(log)))
    run.handle(record(event="job_finished", job_id=9))
    run.handle(job_info(10, "case_summary", "c4"))
    run.handle(record(event="job_finished", job_id=10))
    run.close()
    lines = [line.split(" ", 1)[1] if line[:2].isdigit() else line for line in stream.getvalue().splitlines()]
    assert lines[1:8] == [
        "case c4: simulate beam 1 started (B1)",  # no intake.json: the number of beams is not known
        f"case c4 FAILED at simulate beam B1: SIMULATION FAILED for moqui_tps_B1.in: engine exited with 3 (log: {log})",
        "    SIMULATION FAILED for moqui_tps_B1.in: engine exited with 3",
        "case c4: simulate beam B1 started again",
        "case c4 FAILED again at simulate beam B1: SIMULATION FAILED for moqui_tps_B1.in: engine exited with 3",
        "case c4: simulate beam B1 started again",
        "case c4 finished in 0s",
    ]
    assert ": 1 finished." in lines[8]


def test_terminal_gets_a_live_table(layout: state.Layout) -> None:
    run, stream, _ = make(layout, terminal=True)
    run.handle(record("Workflow has started!", event="workflow_started"))
    run.handle(job_info(1, "interpret", "c3"))
    run.handle(record(event="job_finished", job_id=1))
    run.handle(record("Nothing to be done (all requested files are present and up to date)."))
    run.close()
    text = stream.getvalue()
    assert "\x1b[" in text and "c3" in text and "interpret" in text and "all steps" in text
    assert "Nothing to be done" in text and "mqi: run ended after 0s: 1 unfinished." in text


def test_a_run_with_nothing_to_do_says_so(layout: state.Layout) -> None:
    run, stream, _ = make(layout)
    run.handle(record("Workflow has started!", event="workflow_started"))
    run.handle(record("Nothing to be done (all requested files are present and up to date)."))
    run.handle(record("Complete log(s): /work/.snakemake/log/run.snakemake.log"))
    run.close()
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("Nothing to be done")
    assert lines[2].startswith("mqi: run ended after 0s: nothing to do.") and len(lines) == 3


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4s"), (72, "1m12s"), (3600 * 2 + 300, "2h05m")])
def test_elapsed(seconds: float, text: str) -> None:
    assert console.elapsed(seconds) == text


@pytest.mark.parametrize(
    ("dryrun", "wanted", "writes"), [(False, "account", True), (True, "account", False), (False, "snakemake", False)]
)
def test_the_plugin_writes_the_console_only_for_a_run(dryrun: bool, wanted: str, writes: bool) -> None:
    common = SimpleNamespace(
        dryrun=dryrun, verbose=False, debug_dag=False, nocolor=True, quiet=None, printshellcmds=True
    )
    common.show_failed_logs = True
    handler = LogHandler(common, LogHandlerSettings(console=wanted))  # type: ignore[arg-type]
    assert handler.writes_to_stream is writes and (handler.console is not None) is writes


def test_the_summary_names_where_each_failed_case_failed(layout: state.Layout) -> None:
    run, stream, _ = make(layout)
    run.handle(record(event="workflow_started"))
    run.handle(job_info(1, "interpret", "bad", log="logs/bad/interpret.log"))
    run.handle(record("job failed", logging.ERROR, event="job_error", jobid=1, rule_name="interpret", log=[]))
    run.handle(job_info(2, "intake", "slow"))  # still running when the run ends (killed)
    run.close()
    last = stream.getvalue().splitlines()[-1]
    assert "1 failed (bad at interpret), 1 unfinished." in last, last

"""`bin/mqi status` during a run tells the truth (issue 23, item 4): the cases of the running run
not started yet are this run's, not the next one's, and the jobs-done count grows as jobs end.
Watched as an operator does: `python -m mqi_communicator.ops.status --json` polled beside a real
Snakemake run; and a run that died is not believed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from mqi_communicator import settings
from mqi_communicator.intake.case_inputs import stat_fingerprint
from mqi_communicator.ops import recorder, state, status
from mqi_communicator.ops.status import NEXT_RUN_TAKES_IT, THIS_RUN_TAKES_IT
from tests import casegen
from tests.workflow import REPO, SNAKEMAKE, status_json, write_config

CASES = ("case_a", "case_b", "case_c", "case_d")


def watch(work: Path, run: subprocess.Popen[str], seen: list[dict]) -> None:
    """What status says, again and again, until the run has ended (each call is a fresh process;
    the pause between calls leaves the run the CPU it needs, it decides nothing)."""
    while run.poll() is None:
        seen.append(status_json(work))
        time.sleep(0.3)


def test_status_follows_a_run_of_four_cases(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    for number, case_id in enumerate(CASES, 1):
        casegen.write_case(scan, case_id, casegen.standard_case(f"PSEUDO10{number}", "G2", layers=2))
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)
    before = {c["case_id"]: c for c in status_json(work)["cases"]}
    assert {case_id: before[case_id]["reason"] for case_id in CASES} == dict.fromkeys(CASES, NEXT_RUN_TAKES_IT)

    # One core: the cases' jobs run one after another, so the watcher sees the run part-way.
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", "test-config.yaml", "--cores", "1"]
    run = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict] = []
    watcher = threading.Thread(target=watch, args=(work, run, seen), daemon=True)
    watcher.start()
    try:
        _, stderr = run.communicate(timeout=900)
    finally:
        run.kill()
    watcher.join(timeout=120)
    assert not watcher.is_alive()
    assert run.returncode == 0, stderr[-3000:]

    during = [s for s in seen if s["last_run"].get("status") == "running"]
    assert during, f"the watcher never saw the run running ({len(seen)} snapshots)"
    states = [{c["case_id"]: (c["state"], c["reason"]) for c in s["cases"]} for s in during]
    # A case of this run not started yet is this run's, never "the next run takes it".
    assert any(("queued", THIS_RUN_TAKES_IT) in snapshot.values() for snapshot in states), states
    assert not any(("queued", NEXT_RUN_TAKES_IT) in snapshot.values() for snapshot in states), states
    # The count grows while the run goes on, and is never behind a case that finished.
    done = [s["last_run"]["jobs_done"] for s in during]
    assert done == sorted(done), done
    assert len(set(done)) > 1 and max(done) > 0, done
    for snapshot, counted in zip(states, done, strict=True):
        if any(state == "finished" for state, _ in snapshot.values()):
            assert counted > 0, (snapshot, counted)

    after = status_json(work)
    assert after["last_run"]["status"] == "ok"
    assert after["last_run"]["jobs_done"] >= max(done) and after["last_run"]["jobs_failed"] == 0
    assert {c["case_id"]: c["state"] for c in after["cases"]} == dict.fromkeys(CASES, "finished")
    assert json.loads((work / ".mqi" / "run_plan.json").read_text())["cases"] == list(CASES)


def test_the_plan_of_a_dead_run_is_not_believed(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "case_a", casegen.standard_case("PSEUDO201", "G2", layers=2))
    work = tmp_path / "work"
    (work / ".mqi").mkdir(parents=True)
    write_config(work, scan)
    # A run killed without a word: its process is gone, its records still say "running".
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    started = time.time()
    (work / ".mqi" / "run_plan.json").write_text(
        json.dumps({"pid": gone.pid, "host": host, "started": started, "cases": ["case_a"]})
    )
    last_run = {"status": "running", "pid": gone.pid, "host": host, "started": started, "jobs_done": 3}
    (work / ".mqi" / "last_run.json").write_text(json.dumps(last_run))
    report = status_json(work)
    assert report["last_run"]["status"] == "killed"
    assert [(c["state"], c["reason"]) for c in report["cases"]] == [("queued", NEXT_RUN_TAKES_IT)]


def test_a_running_run_s_cases_are_told_apart_from_the_next_run_s(tmp_path: Path) -> None:
    """This process stands for the running run (its pid is alive): of three ready cases, the two in
    its plan are this run's, one of them retried, and the disk guard holds back only the third."""
    scan = tmp_path / "scan"
    for case_id in ("planned", "planned_retry", "later"):
        casegen.write_case(scan, case_id, casegen.standard_case("PSEUDO301", "G2", layers=1))
    work = tmp_path / "work"
    (work / ".mqi").mkdir(parents=True)
    layout = state.Layout.from_config(settings.validate({"paths": {"local": {"scan_directory": str(scan)}}}), work)
    failure = state.Failure(
        step="simulate",
        reason="engine unreachable",
        log="logs/planned_retry/simulate.log",
        time=time.time(),
        attempts=1,
        transient=True,
        fingerprint=stat_fingerprint(scan / "planned_retry"),
    )
    layout.processing("planned_retry").joinpath("state").mkdir(parents=True)
    (layout.processing("planned_retry") / state.FAILED).write_text(json.dumps(asdict(failure)))
    run = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    plan = {**run, "cases": ["planned", "planned_retry"]}
    recorder.run_plan_path(work).write_text(json.dumps(plan))

    cases = status.collect(layout, work, run)
    status.hold_back(cases, "the disk is full")
    told = {c.case_id: (c.state, c.reason) for c in cases}
    assert told["planned"] == ("queued", THIS_RUN_TAKES_IT)
    assert told["planned_retry"][0] == "retrying" and told["planned_retry"][1].endswith("; this run retries it]")
    assert told["later"] == ("waiting", "the disk is full")
    # Another run's plan (a pid the last run does not name) is not this one's.
    recorder.run_plan_path(work).write_text(json.dumps({**plan, "pid": os.getpid() + 1}))
    assert {c.case_id: c.reason for c in status.collect(layout, work, run)}["planned"] == NEXT_RUN_TAKES_IT

"""A year of unattended runs, through real Snakemake runs: finished cases stay final whatever the
settings say, `bin/mqi reprocess` redoes exactly one case and keeps its old results, failures at
every step are recorded (step, reason, log) and shown by `bin/mqi status`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import yaml

from tests import casegen
from tests.alert_servers import Inbox, alerts_section
from tests.workflow import REPO, full_log, snakemake, standin_copies, tree_digest, write_config

MQI = str(REPO / "bin" / "mqi")
PYTHON = sys.executable


def status(work: Path, *args: str) -> dict:
    run = subprocess.run(
        [PYTHON, "-m", "mqi_communicator.ops.status", "--configfile", "test-config.yaml", "--json", "--all", *args],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)


def by_case(report: dict) -> dict[str, dict]:
    return {c["case_id"]: c for c in report["cases"]}


def planned_jobs(work: Path, config: Path) -> str:
    dry = snakemake(work, "--dry-run", "--configfile", str(config))
    assert dry.returncode == 0, dry.stderr[-2000:]
    return dry.stdout + dry.stderr


def planned_rules(planned: str) -> set[str]:
    return set(re.findall(r"^rule (\w+):", planned, re.MULTILINE))


def test_finished_cases_stay_final_and_reprocess_redoes_one(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "alpha")
    casegen.write_case(scan, "beta", casegen.standard_case("PSEUDO002", "G1"))
    work = tmp_path / "work"
    work.mkdir()
    base = write_config(work, scan)
    first = snakemake(work)
    assert first.returncode == 0, first.stderr[-3000:]
    dicom = {case: work / "data" / "cases" / case / "dicom" for case in ("alpha", "beta")}
    before = {case: tree_digest(d) for case, d in dicom.items()}
    recalibrated = work / "recalibrated.yaml"
    record = yaml.safe_load((work / "config" / "calibration.yaml").read_text())
    record["entries"] = [{**e, "gy_per_unit": 2 * e["gy_per_unit"]} for e in record["entries"]]
    recalibrated.write_text(yaml.safe_dump(record))

    # Every operational setting and every result setting, edited in turn: nothing to do for a
    # finished case (before, raising a timeout replanned every beam: "Params have changed").
    edits = {
        "simulation.timeout_seconds": {"simulation": {"timeout_seconds": 7200}},
        "simulation.gpu_devices": {"simulation": {"gpu_devices": [1, 2]}},
        "application.polling_interval_seconds": {"application": {"polling_interval_seconds": 5}},
        "application.max_attempts": {"application": {"max_attempts": 5}},
        "hpc_connection.host": {"hpc_connection": {"host": "login2", "retries": 5}},
        "interpreter.csv_layout (result)": {"interpreter": {"csv_layout": "single_line"}},
        "calibration.record (result)": {"calibration": {"record": str(recalibrated)}},
        "rooms / engine (result)": {"executables": {"moqui": str(REPO / "tests" / "standins" / "tps_env_faulty")}},
    }
    for name, edit in edits.items():
        config = yaml.safe_load(base.read_text()) | edit
        edited = work / "edited.yaml"
        edited.write_text(yaml.safe_dump(config))
        planned = planned_jobs(work, edited)
        assert planned_rules(planned) <= {"all"}, f"{name}: {planned[-1500:]}"
        for case in ("alpha", "beta"):
            assert f"cases/{case}/" not in planned, name

    # Reprocess exactly one case: its old results are moved aside, the other case is untouched.
    again = subprocess.run(
        [MQI, "reprocess", "alpha", "--configfile", "test-config.yaml"], cwd=work, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    superseded = sorted((work / "data" / "cases" / "alpha").glob("dicom.superseded-*"))
    assert len(superseded) == 1 and tree_digest(superseded[0]) == before["alpha"]
    planned = planned_jobs(work, base)
    assert "cases/alpha/" in planned and "cases/beta/" not in planned
    rerun = snakemake(work)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree_digest(dicom["beta"]) == before["beta"]  # same bytes, same mtimes
    assert sorted(p.name for p in dicom["alpha"].iterdir()) == sorted(before["alpha"])
    assert planned_rules(planned_jobs(work, base)) <= {"all"}


def test_reprocess_from_a_step_keeps_the_earlier_results(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "gamma")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)
    assert snakemake(work).returncode == 0
    manifest = work / "data" / "cases" / "gamma" / "intermediate" / "intake.json"
    mtime = manifest.stat().st_mtime_ns
    run = subprocess.run(
        [MQI, "reprocess", "gamma", "--from", "simulate", "--configfile", "test-config.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    planned = planned_jobs(work, work / "test-config.yaml")
    assert "rule simulate:" in planned
    for earlier in ("rule intake:", "rule interpret:", "rule moqui_input:"):
        assert earlier not in planned
    assert manifest.stat().st_mtime_ns == mtime


def _faulty_site(tmp_path: Path, alerts: dict) -> tuple[Path, Path]:
    """Four cases failing at intake, P2, the engine and P3, and one good case; the engine and the
    interpreter are stand-ins through the real command contracts (tests/standins)."""
    standins = standin_copies(tmp_path, "zz_engine engine\nzz_p3 p3\n")
    scan = tmp_path / "scan"
    casegen.write_case(scan, "good")
    broken = casegen.write_case(scan, "zz_intake")
    sorted(next(p for p in sorted(broken.iterdir()) if p.is_dir()).glob("*.ptn"))[1].unlink()
    for case in ("zz_p2fail", "zz_engine", "zz_p3"):
        casegen.write_case(scan, case)
    work = tmp_path / "work"
    work.mkdir()
    write_config(
        work,
        scan,
        executables={
            "moqui": str(standins / "tps_env_faulty"),
            "python_interpreter": PYTHON,
            "mqi_interpreter": str(standins / "mqi_interpreter_faulty"),
        },
        interpreter={"mode": "external"},
        alerts=alerts,
    )
    return scan, work


def received(inbox: Inbox, webhook: ThreadingHTTPServer) -> tuple[list[str], list[tuple[str, str]]]:
    """Subjects of the e-mails, and (kind, case) of the webhook posts, received so far."""
    subjects = [str(message["Subject"]) for _, message in inbox.messages]
    posts = [(body["kind"], body["case_id"]) for _, body in webhook.posts]  # type: ignore[attr-defined]
    return subjects, posts


def test_a_failure_at_each_step_is_recorded_and_shown(
    tmp_path: Path, smtp: tuple[Inbox, int], webhook: ThreadingHTTPServer
) -> None:
    inbox, smtp_port = smtp
    scan, work = _faulty_site(tmp_path, alerts_section(smtp_port, webhook.server_port))
    run = snakemake(work, timeout=900)
    assert run.returncode != 0
    cases = by_case(status(work))
    expected = {
        "zz_intake": ("intake", "3 PTN files for 4 delivered layers"),
        "zz_p2fail": ("interpret", "external mqi_interpreter exited with 1"),
        "zz_engine": ("simulate", "FATAL ERROR"),
        "zz_p3": ("rtdose_beam", "1000 bytes, expected 1280000"),
    }
    for case, (step, reason) in expected.items():
        entry = cases[case]
        assert entry["state"] == "failed", entry
        assert entry["step"] == step, entry
        record = json.loads((work / "data" / "cases" / case / "intermediate" / "state" / "failed.json").read_text())
        assert reason in record["reason"], record
        assert (work / entry["log"]).is_file()
    assert cases["good"]["state"] == "finished"
    # Exactly one alert per failed case, by e-mail and by webhook; the good case has no TPS dose:
    # its QA verdict NOT ASSESSED is not a PASS and is sent once too.
    subjects, posts = received(inbox, webhook)
    assert sorted(posts) == sorted([*(("case_failed", case) for case in expected), ("case_verdict", "good")])
    assert len(subjects) == len(expected) + 1
    assert any("case good QA NOT ASSESSED" in s for s in subjects)
    for case in expected:
        assert sum(case in subject for subject in subjects) == 1, subjects

    # The next run retries none of them (nothing changed) and says why; no alert again.
    again = snakemake(work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert planned_rules(full_log(again)) <= {"all"}
    for case in expected:
        assert f"skipping case {case}" in again.stderr

    # Fixing a case (the missing log arrives) makes it a target again; it then finishes.
    casegen.write_case(scan, "zz_intake")
    fixed = snakemake(work)
    assert by_case(status(work))["zz_intake"]["state"] == "finished", fixed.stderr[-2000:]
    assert not (work / "data" / "cases" / "zz_intake" / "intermediate" / "state" / "failed.json").exists()
    subjects, posts = received(inbox, webhook)
    assert posts[len(expected) + 1 :] == [("case_recovered", "zz_intake"), ("case_verdict", "zz_intake")]
    assert len(subjects) == len(expected) + 3
    assert "case zz_intake recovered, QA NOT ASSESSED" in subjects[-2]

    # An explicit retry of a permanent failure: it runs again (and fails again, once).
    retry = subprocess.run([MQI, "retry", "zz_engine", "--configfile", "test-config.yaml"], cwd=work, check=True)
    assert retry.returncode == 0
    assert "rule simulate:" in planned_jobs(work, work / "test-config.yaml")


def test_status_follows_a_beam_from_queued_to_running_to_done(tmp_path: Path) -> None:
    standins = standin_copies(tmp_path, "slow sleep 6\n")
    scan = tmp_path / "scan"
    casegen.write_case(scan, "slow")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, executables={"moqui": str(standins / "tps_env_faulty")})
    assert by_case(status(work))["slow"]["state"] == "queued"
    from tests.workflow import SNAKEMAKE

    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", "test-config.yaml", "--cores", "1"]
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[tuple[str, str]] = []
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        entry = by_case(status(work))["slow"]
        if not seen or seen[-1] != (entry["state"], entry["step"]):
            seen.append((entry["state"], entry["step"]))
        time.sleep(0.3)
    assert process.wait(timeout=60) == 0
    seen.append((by_case(status(work))["slow"]["state"], ""))
    states = [s for s, _ in seen]
    assert states[-1] == "finished"
    running_steps = [step for s, step in seen if s == "running"]
    assert "simulate" in running_steps, seen
    # The live view shows the same state; Ctrl-C ends it cleanly.
    watch = subprocess.Popen(
        [MQI, "status", "--watch", "--interval", "0.5", "--configfile", "test-config.yaml"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "slow" in out and "finished" in out

"""How a failure becomes waiting, transient, permanent or a software fault (docs/failures.md):
real step CLIs fail with their stderr in their log, as the rules run them, and the run recorder
turns each log into the case's failed.json, an alert or none, and a retry decision."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mqi_communicator
from mqi_communicator import cli, settings
from mqi_communicator.errors import MqiError
from mqi_communicator.ops import recorder, state
from tests import casegen
from tests.alert_servers import alerts_section, closed_port

PACKAGE = Path(mqi_communicator.__file__).parent


def _record(**fields: object) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": "", "levelno": logging.INFO, **fields})


def _step(log: Path, module: str, *args: str) -> int:
    """A step's CLI with stdout and stderr to its log (`> {log} 2>&1`, as every rule runs it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        command = [sys.executable, "-m", f"mqi_communicator.{module}", *args]
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=120, check=False).returncode


@pytest.fixture
def site(tmp_path: Path, webhook: Any) -> tuple[dict[str, Any], Path, Any]:
    scan = tmp_path / "scan"
    scan.mkdir()
    config = settings.validate(
        {
            "paths": {"local": {"scan_directory": str(scan)}},
            "alerts": alerts_section(closed_port(), webhook.server_port) | {"email": {"to": []}},
        }
    )
    return config, tmp_path, webhook


def _recorded(site: tuple[dict[str, Any], Path, Any], case_id: str, rule: str, log: Path) -> state.Failure:
    """The run recorder sees the job start and fail, as the logger plugin hands it Snakemake's records."""
    config, workdir, _ = site
    recorder.configure(config, workdir)
    run = recorder.RunRecorder(dryrun=False)
    run.handle(_record(event="workflow_started"))
    run.handle(_record(event="job_info", jobid=1, rule_name=rule, wildcards={"case_id": case_id}, log=[str(log)]))
    run.handle(_record(event="job_error", jobid=1, rule_name=rule, log=[str(log)]))
    layout = state.Layout.from_config(config, workdir)
    failure = state.Failure.read(layout.processing(case_id) / state.FAILED)
    assert failure is not None, "no failed.json written"
    return failure


def _decision(site: tuple[dict[str, Any], Path, Any], case_id: str, failure: state.Failure) -> tuple[bool, str]:
    config, workdir, _ = site
    layout = state.Layout.from_config(config, workdir)
    return state.retry_decision(layout, layout.scan_dir / case_id, failure)


def test_a_case_fault_is_permanent_said_in_one_line_and_alerted(site: tuple[dict[str, Any], Path, Any]) -> None:
    _, workdir, hook = site
    case = casegen.write_case(workdir / "scan", "noplan")
    next(case.glob("RP.*.dcm")).unlink()
    log = workdir / "logs" / "noplan" / "intake.log"
    assert _step(log, "intake", "--case", str(case), "--output", str(workdir / "intake.json")) == 1
    text = log.read_text()
    assert "Traceback" not in text and text.splitlines()[0].startswith("INTAKE FAILED for case noplan: ")
    failure = _recorded(site, "noplan", "intake", log)
    assert (failure.kind, failure.transient, failure.attempts) == ("permanent", False, 1)
    assert "no RT Ion Plan" in failure.reason and cli.MARKER not in failure.reason
    assert _decision(site, "noplan", failure) == (False, "waits for a change of the case or `bin/mqi retry`")
    [(_, alert)] = hook.posts
    assert alert["kind"] == "case_failed" and "software fault" not in alert["body"]


def test_a_bug_is_a_software_fault_with_its_traceback_never_the_cases(site: tuple[dict[str, Any], Path, Any]) -> None:
    """A KeyError (here: an intake.json whose beams lack their folder name, which no intake
    writes and the contract's cheap check lets through) is a bug: its traceback, and a record
    that is retried and alerted as a software fault, not the case's."""
    _, workdir, hook = site
    case = casegen.write_case(workdir / "scan", "buggy")
    manifest = workdir / "intake.json"
    assert _step(workdir / "intake.log", "intake", "--case", str(case), "--output", str(manifest)) == 0
    record = json.loads(manifest.read_text())
    for beam in record["beams"]:
        del beam["sanitized_name"]
    manifest.write_text(json.dumps(record))
    log = workdir / "logs" / "buggy" / "moqui_input_B1.log"
    args = ["--manifest", str(manifest), "--p2", str(workdir / "p2"), "--beam", "B1"]
    args += ["--parameters", str(workdir / "B1.in"), "--logdir", str(workdir / "B1"), "--output-dir", str(workdir)]
    assert _step(log, "moqui_input", *args) == 1
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and "KeyError: 'sanitized_name'" in text
    assert "MOQUI input FAILED for beam B1: software fault, not the case's: KeyError: 'sanitized_name'" in text
    failure = _recorded(site, "buggy", "moqui_input", log)
    assert (failure.kind, failure.transient, failure.attempts) == ("software", True, 1)
    assert failure.reason.startswith("MOQUI input FAILED for beam B1: software fault")
    again, why = _decision(site, "buggy", failure)
    assert again and why == "software fault, attempt 2 of 3"
    [(_, alert)] = hook.posts  # at once, not after the attempts: a bug needs a person
    assert "software fault" in alert["body"] and "not the case's fault" in alert["body"]


def test_a_case_still_waiting_is_neither_an_attempt_nor_alerted(site: tuple[dict[str, Any], Path, Any]) -> None:
    _, workdir, hook = site
    late = casegen.write_case(workdir / "scan", "late")
    shutil.rmtree(sorted(p for p in late.iterdir() if p.is_dir())[1])  # one beam's delivery is not there yet
    log = workdir / "logs" / "late" / "intake.log"
    assert _step(log, "intake", "--case", str(late), "--output", str(workdir / "intake.json")) == 1
    assert log.read_text().startswith("INTAKE WAITING for case late: ")
    failure = _recorded(site, "late", "intake", log)
    assert (failure.kind, failure.attempts) == ("waiting", 0)
    assert _decision(site, "late", failure) == (True, "still waiting for its deliveries")
    assert hook.posts == []


def test_an_engine_timeout_is_transient_and_alerted_once_the_attempts_are_spent(
    site: tuple[dict[str, Any], Path, Any],
) -> None:
    _, workdir, hook = site
    casegen.write_case(workdir / "scan", "slow")
    engine = workdir / "tps_env"
    engine.write_text("#!/bin/sh\nsleep 30\n")
    engine.chmod(0o755)
    parameters = workdir / "moqui_tps_B1.in"
    parameters.write_text(
        f"GPUID 0\nBeamNumbers 1\nDicomDir {workdir}\nlogFilePath {workdir}\nOutputDir {workdir / 'o'}\n"
    )
    log = workdir / "logs" / "slow" / "simulate_B1.log"
    args = ["--input", str(parameters), "--tps-env", str(engine), "--moqui-dir", str(workdir), "--log", str(log)]
    args += ["--output-raw", str(workdir / "B1_Dose.raw"), "--record", str(workdir / "B1.json"), "--timeout", "1"]
    args += ["--gpu-lock-dir", str(workdir / "locks")]
    log.parent.mkdir(parents=True)
    with open(log, "a") as handle:  # the simulate rule appends (`>> {log} 2>&1`) to the engine's log
        command = [sys.executable, "-m", "mqi_communicator.simulate", *args]
        assert subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=60, check=False).returncode == 1
    assert log.read_text().count("SIMULATION FAILED for moqui_tps_B1.in: engine still running after") == 1
    for attempt in (1, 2, 3):
        failure = _recorded(site, "slow", "simulate", log)
        assert (failure.kind, failure.attempts) == ("transient", attempt)
        assert len(hook.posts) == (1 if attempt == 3 else 0)
    assert _decision(site, "slow", failure)[0] is False  # application.max_attempts spent: waits


def test_a_log_without_a_marker_is_read_by_what_wrote_it(tmp_path: Path) -> None:
    """No marker: the step was killed or failed before the runner ran. The scheduler's and the
    kernel's words are transient, a Python traceback a software fault, no log at all transient."""
    log = tmp_path / "step.log"
    node_fail = "slurmstepd: error: *** JOB 12 ON node1 CANCELLED AT 2026-11-30T13:16:00 DUE TO NODE_FAIL ***"
    log.write_text(node_fail + "\n")
    assert recorder.failure_kind([str(log)], recorder.failure_reason([str(log)], "")) == "transient"
    broken = subprocess.run([sys.executable, "-c", "import mqi_communicator.no_such_module"], capture_output=True)
    log.write_bytes(broken.stderr)
    assert recorder.failure_kind([str(log)], recorder.failure_reason([str(log)], "")) == "software"
    assert recorder.failure_kind([str(tmp_path / "never_written.log")], "") == "transient"
    log.write_text("some tool: cannot open input\n")
    assert recorder.failure_kind([str(log)], recorder.failure_reason([str(log)], "")) == "permanent"


def test_a_record_written_before_kinds_is_read_as_it_was_meant(tmp_path: Path) -> None:
    path = tmp_path / "failed.json"
    old = {"step": "simulate", "reason": "x", "log": "l", "time": 0.0, "attempts": 2, "transient": True}
    for transient, kind in ((True, "transient"), (False, "permanent")):
        path.write_text(json.dumps(old | {"transient": transient, "fingerprint": "f"}))
        failure = state.Failure.read(path)
        assert failure is not None and failure.kind == "" and failure.kind_of == kind


def test_the_last_marker_of_a_log_is_its_word(tmp_path: Path) -> None:
    first = cli.marker_line("transient", "simulate", "SimulationError", "no free GPU")
    last = cli.marker_line("permanent", "simulate", "SimulationError", 'engine exited with 3\n"quoted"')
    record = cli.read_marker(f"engine output\n{first}\nmore output\n{last}\n")
    assert record == {
        "kind": "permanent",
        "step": "simulate",
        "error": "SimulationError",
        "message": 'engine exited with 3\n"quoted"',
    }
    assert cli.read_marker("mqi-failure {not json\n") is None


def _exception_classes() -> list[tuple[str, type]]:
    """Every class the package's source defines that Python treats as an exception, found by
    reading each module's class statements and importing the module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        names = [node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)]
        if not names:
            continue
        module_name = ".".join(("mqi_communicator", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = importlib.import_module(module_name)
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append((f"{module_name}.{name}", cls))
    return found


def test_every_exception_class_of_the_package_derives_from_mqi_error() -> None:
    classes = _exception_classes()
    names = {name.rsplit(".", 1)[1] for name, _ in classes}
    # The ones the issue counted, so that a search that finds nothing cannot pass.
    assert {"CaseError", "CaseWaiting", "SimulationError", "EngineError", "GeometryError", "TransferError"} <= names
    assert {"CalibrationError", "TpsDoseProblem", "StagingError", "JobFailed", "Unreachable", "Stopped"} <= names
    outside = [name for name, cls in classes if not issubclass(cls, MqiError)]
    assert outside == [], f"exception classes not under errors.MqiError: {outside}"

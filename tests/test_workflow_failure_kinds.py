"""A bug met in a real Snakemake run is a software fault (docs/failures.md): the step's log has
the traceback, the console says so, and the case's record is not the case's permanent fault."""

from __future__ import annotations

import json
from pathlib import Path

from mqi_communicator.ops import state
from tests import casegen
from tests.workflow import snakemake, write_config


def test_a_bug_in_a_step_is_recorded_as_a_software_fault(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "c1")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)
    first = snakemake(work, "--until", "intake", timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    # An intake.json whose beams lack their folder name, which no intake writes and the
    # contract's cheap check lets through: P2 meets a KeyError, a bug.
    manifest = work / "data" / "cases" / "c1" / "intermediate" / "intake.json"
    record = json.loads(manifest.read_text())
    for beam in record["beams"]:
        del beam["sanitized_name"]
    manifest.write_text(json.dumps(record))
    run = snakemake(work, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    log = (work / "logs" / "c1" / "interpret.log").read_text()
    assert "Traceback (most recent call last):" in log and "KeyError: 'sanitized_name'" in log
    assert "case c1 FAILED at interpret: P2 FAILED for case c1: software fault, not the case's: KeyError" in output
    failed = json.loads((manifest.parent / state.FAILED).read_text())
    assert (failed["kind"], failed["step"], failed["attempts"]) == ("software", "interpret", 1)
    assert "Traceback" not in failed["reason"] and "mqi-failure" not in failed["reason"]
    # Tried again by the next run (a fix may have come), not left as the case's fault.
    dry = snakemake(work, "--dry-run", timeout=600)
    assert "retrying case c1: software fault, attempt 2 of 3" in dry.stdout + dry.stderr

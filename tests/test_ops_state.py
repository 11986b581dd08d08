"""Case state on disk without a Snakemake run: which cases are targets, when a failed case is tried
again, what `verify` and `status` make of a finished case whose files changed, and what
`reprocess` moves aside."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from mqi_communicator import settings
from mqi_communicator.intake.case_inputs import content_record, stat_fingerprint
from mqi_communicator.ops import reprocess, state, status, verify
from mqi_communicator.ops.recorder import TRANSIENT_PATTERNS, failure_reason
from tests import casegen
from tests.conftest import REPO


@pytest.fixture
def site(tmp_path: Path) -> tuple[state.Layout, Path]:
    scan = tmp_path / "scan"
    for name in ("done", "failing", "new"):
        casegen.write_case(scan, name)
    casegen.write_case(scan, "unready", ready=False)
    config = settings.validate({"paths": {"local": {"scan_directory": str(scan)}}})
    layout = state.Layout.from_config(config, tmp_path / "work")
    done = layout.processing("done")
    done.mkdir(parents=True)
    (done / "intake.json").write_text(json.dumps({"inputs": content_record(scan / "done")}))
    (done / state.SUMMARY).write_text(json.dumps({"case_id": "done", "qa": {"verdict": "PASS"}}))
    return layout, scan


def fail(layout: state.Layout, case: str, *, transient: bool, attempts: int = 1) -> None:
    failure = state.Failure(
        step="simulate",
        reason="SIMULATION FAILED: engine exited with 1",
        log=f"logs/{case}/simulate_1G180_TX.log",
        time=time.time(),
        attempts=attempts,
        transient=transient,
        fingerprint=stat_fingerprint(layout.scan_dir / case),
    )
    path = layout.processing(case) / state.FAILED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(failure)))


def test_targets_skip_finished_unready_and_failed_cases(site: tuple[state.Layout, Path]) -> None:
    layout, scan = site
    warnings: list[str] = []
    assert state.targets(layout, warnings.append) == ["failing", "new"]  # finished and unready are not
    fail(layout, "failing", transient=False)
    assert state.targets(layout, warnings.append) == ["new"]
    assert any("skipping case failing: simulate" in w and "bin/mqi retry" in w for w in warnings)
    # A retry request, or a change of the case, makes it a target again.
    (layout.processing("failing") / state.RETRY).write_text("")
    assert state.targets(layout, warnings.append) == ["failing", "new"]
    (layout.processing("failing") / state.RETRY).unlink()
    (scan / "failing" / "late_note.txt").write_text("a file arrived")
    assert state.targets(layout, warnings.append) == ["failing", "new"]


def test_transient_failures_are_retried_up_to_max_attempts(site: tuple[state.Layout, Path]) -> None:
    layout, _ = site
    for attempts in range(1, layout.max_attempts):
        fail(layout, "failing", transient=True, attempts=attempts)
        assert "failing" in state.targets(layout, lambda _: None)
    fail(layout, "failing", transient=True, attempts=layout.max_attempts)
    assert "failing" not in state.targets(layout, lambda _: None)


def test_failure_reason_and_transient_classification(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    log.write_text("reading plan\nINTAKE FAILED for case c: 1 problem(s):\n  - x.ptn: empty log\n")
    reason = failure_reason([str(log)], "fallback")
    assert reason.startswith("INTAKE FAILED") and "empty log" in reason
    assert state.headline(reason) == "x.ptn: empty log"
    assert not TRANSIENT_PATTERNS.search(reason)
    assert TRANSIENT_PATTERNS.search("squeue failed: Connection refused by login node")
    assert TRANSIENT_PATTERNS.search("slurmstepd: error: *** JOB 12 ON node1 CANCELLED DUE TO NODE_FAIL ***")
    assert failure_reason([str(tmp_path / "missing.log")], "no log") == "no log"


def test_a_finished_case_whose_file_changes_is_reported_not_rerun(site: tuple[state.Layout, Path]) -> None:
    layout, scan = site
    workdir = layout.logs_dir.parent
    ptn = sorted((scan / "done").rglob("*.ptn"))[0]
    old = ptn.stat()
    assert verify.verify_case(layout, "done", None) == []
    ptn.write_bytes(ptn.read_bytes()[::-1])
    os.utime(ptn, ns=(old.st_atime_ns, old.st_mtime_ns))  # replaced under its old timestamp
    changed = verify.verify_case(layout, "done", None)
    assert changed == [str(ptn.relative_to(scan / "done"))]
    assert "done" not in state.targets(layout, lambda _: None)  # never silently recomputed
    cases = {c.case_id: c for c in status.collect(layout, workdir)}
    assert cases["done"].state == "changed" and changed[0] in cases["done"].reason
    assert cases["unready"].state == "waiting" and cases["new"].state == "queued"


def test_verify_sweep_checks_a_few_cases_in_turn(site: tuple[state.Layout, Path]) -> None:
    layout, _ = site
    workdir = layout.logs_dir.parent
    seen = []
    for _ in range(4):
        before = json.loads((workdir / verify.CURSOR).read_text())["next"] if (workdir / verify.CURSOR).exists() else 0
        verify.sweep(layout, workdir, 2, None)
        seen.append(before)
    assert seen == [0, 2, 0, 2]  # 4 cases, 2 per run, wrapping around


def test_reprocess_moves_results_aside(site: tuple[state.Layout, Path]) -> None:
    layout, _ = site
    dicom = Path(layout.dicom_template.replace("{case_id}", "done"))
    dicom.mkdir(parents=True)
    (dicom / "RD_1G180_TX.dcm").write_bytes(b"old dose")
    moved = reprocess.reprocess(layout, "done")
    assert not (layout.processing("done") / state.SUMMARY).exists()
    asides = {folder.name: aside for folder, aside in moved}
    assert (asides["dicom"] / "RD_1G180_TX.dcm").read_bytes() == b"old dose"
    assert (asides["intermediate"] / state.SUMMARY).is_file()
    assert "done" in state.targets(layout, lambda _: None)
    with pytest.raises(ValueError, match="no case folder"):
        reprocess.reprocess(layout, "nosuchcase")


def test_status_names_a_missing_scan_folder_instead_of_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_scan_folder"
    site = tmp_path / "site.yaml"
    site.write_text(f"paths:\n  local:\n    scan_directory: {missing}\n")
    done = subprocess.run(
        [str(REPO / "bin" / "mqi"), "status", "--configfile", str(site), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"mqi status: the scan folder {missing} (paths.local.scan_directory) is not a folder"
    )

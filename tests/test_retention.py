"""Retention of a finished case's intermediates, without a Snakemake run: what is removed and what
is kept, byte for byte; which cases a run prunes (only the queued ones that are due, so the cost
does not grow with the finished cases); Snakemake's records of the removed files go with them.
(tests/test_workflow_retention.py does the same through real runs.)"""

from __future__ import annotations

import hashlib
import json
import os
import time
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest

from mqi_communicator import settings
from mqi_communicator.ops import retention, state
from tests import casegen

DAY = 86400.0


def layout_for(tmp_path: Path, **local: str) -> state.Layout:
    config = settings.validate({"paths": {"local": {"scan_directory": str(tmp_path / "scan"), **local}}})
    return state.Layout.from_config(config, tmp_path / "work")


def finished_case(layout: state.Layout, case_id: str, finished: float | None = None) -> dict[str, Path]:
    """A case folder (real plan and logs) and its output folders as the pipeline leaves them: the
    record, and the intermediates of two beams (file names as the rules write them)."""
    casegen.write_case(layout.scan_dir, case_id)
    processing = layout.processing(case_id)
    raw = Path(layout.raw_template.replace("{case_id}", case_id))
    dicom = Path(layout.dicom_template.replace("{case_id}", case_id))
    record = {
        "summary": processing / state.SUMMARY,
        "intake": processing / "intake.json",
        "qa": processing / "qa" / "qa.json",
        "sheet": processing / "qa" / "qa_sheet.html",
        "figure": processing / "report" / "dose_2G90.png",
        "table": processing / "report" / "beams.csv",
        "fraction": processing / "fractions" / "1.json",
        "simulate_record": raw / "2G90.simulate.json",
        "rtdose": dicom / "RD_2G90.dcm",
        "log": layout.logs_dir / case_id / "simulate_2G90.log",
    }
    intermediates = [
        processing / "moqui_csv" / "log" / "2G90" / "01_140.00MeV.csv",
        processing / "moqui_csv" / "plan" / f"RP.{case_id}.dcm",
        processing / "moqui" / "2G90" / "moqui_tps_2G90.in",
        processing / "moqui" / "2G90" / "log" / "2G90" / "01_140.00MeV.csv",
        raw / "2G90_Dose.raw",
        raw / "2G90.moqui" / "2G90_2_Dose.raw",
    ]
    for path in [*record.values(), *intermediates]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(64) + path.name.encode())
    # The JSON files others read (the trend reads qa.json and intake.json) as JSON, unique per case.
    for path in (record["qa"], record["intake"], record["summary"]):
        path.write_text(json.dumps({"case_id": case_id, "beams": [], "nonce": os.urandom(8).hex()}))
    if finished is not None:
        os.utime(record["summary"], (finished, finished))
    return record


def digests(paths: dict[str, Path]) -> dict[str, str]:
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}" for name, p in paths.items()}


def test_pruning_removes_the_intermediates_and_keeps_the_record(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    record = finished_case(layout, "done")
    before = digests(record)
    processing = layout.processing("done")
    # Snakemake's records of two outputs (a directory output, a file output): keyed by the path
    # relative to the workdir, as the rules name them.
    keys = ["data/cases/done/intermediate/moqui_csv", "data/cases/done/raw/2G90_Dose.raw"]
    kept_key = "data/cases/done/dicom/RD_2G90.dcm"
    metadata = work / ".snakemake" / "metadata"
    metadata.mkdir(parents=True)
    for key in [*keys, kept_key]:
        (metadata / urlsafe_b64encode(key.encode()).decode()).write_text("{}")

    freed = retention.prune_case(layout, work, "done")

    assert freed > 6 * 64
    assert not (processing / "moqui_csv").exists() and not (processing / "moqui").exists()
    raw = work / "data" / "cases" / "done" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["2G90.simulate.json"]
    assert digests(record) == before
    assert sorted(p.name for p in metadata.iterdir()) == [urlsafe_b64encode(kept_key.encode()).decode()]
    pruned = json.loads((processing / retention.PRUNED).read_text())
    assert pruned["bytes"] == freed
    assert "data/cases/done/intermediate/moqui_csv" in pruned["removed"]
    # Again (a crash before the queue was updated): nothing left to remove, the record unchanged.
    assert retention.prune_case(layout, work, "done") == 0
    assert json.loads((processing / retention.PRUNED).read_text()) == pruned


def test_a_raw_folder_inside_the_processing_folder_keeps_the_record(tmp_path: Path) -> None:
    """Regenerable files are named one by one: a raw folder that is the processing folder itself
    must not make the record look regenerable."""
    layout = layout_for(tmp_path, raw_output_directory="data/cases/{case_id}/intermediate")
    record = finished_case(layout, "done")
    before = digests(record)
    retention.prune_case(layout, tmp_path / "work", "done")
    assert digests(record) == before
    assert not (layout.processing("done") / "2G90_Dose.raw").exists()


def test_only_a_finished_case_without_running_jobs_is_pruned(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    record = finished_case(layout, "done")
    (layout.processing("done") / state.RUNNING).parent.mkdir(parents=True, exist_ok=True)
    (layout.processing("done") / state.RUNNING).write_text(json.dumps({"jobs": {"3": {"rule": "fraction_check"}}}))
    with pytest.raises(ValueError, match="running jobs"):
        retention.prune_case(layout, work, "done")
    record["summary"].unlink()
    (layout.processing("done") / state.RUNNING).unlink()
    with pytest.raises(ValueError, match="not finished"):
        retention.prune_case(layout, work, "done")
    assert (layout.processing("done") / "moqui_csv").is_dir()


def test_a_run_prunes_only_the_queued_cases_that_are_due(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    now = time.time()
    for case in ("old", "recent", "unqueued"):
        finished_case(layout, case, finished=now - 40 * DAY)
    retention.enqueue(layout, work, "old", finished=now - 40 * DAY)  # builds the queue: all three
    queue = work / retention.QUEUE
    # A queue kept by the runs lists only what they finished: "unqueued" was pruned by hand.
    queue.write_text(
        json.dumps({"case": "old", "finished": now - 40 * DAY})
        + "\n"
        + json.dumps({"case": "recent", "finished": now - 40 * DAY})
        + "\n"
    )
    retention.enqueue(layout, work, "recent", finished=now - 2 * DAY)  # reprocessed since: its latest line counts

    assert retention.prune_due(layout, work, None, now) == {}  # retention: never
    assert (layout.processing("old") / "moqui_csv").is_dir()
    freed = retention.prune_due(layout, work, 30, now)

    assert list(freed) == ["old"]
    assert not (layout.processing("old") / "moqui_csv").exists()
    assert (layout.processing("recent") / "moqui_csv").is_dir()
    assert (layout.processing("unqueued") / "moqui_csv").is_dir()  # not in the queue: not looked at
    assert [json.loads(line)["case"] for line in queue.read_text().splitlines()] == ["recent"]
    # Due a month later; at retention 0 at once.
    assert list(retention.prune_due(layout, work, 0, now)) == ["recent"]
    assert queue.read_text() == ""


def test_a_missing_queue_is_built_once_from_the_finished_cases(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    now = time.time()
    finished_case(layout, "b_old", finished=now - 50 * DAY)
    finished_case(layout, "a_newer", finished=now - 10 * DAY)
    finished_case(layout, "c_pruned", finished=now - 90 * DAY)
    (layout.processing("c_pruned") / retention.PRUNED).parent.mkdir(parents=True, exist_ok=True)
    (layout.processing("c_pruned") / retention.PRUNED).write_text("{}")
    casegen.write_case(layout.scan_dir, "d_unfinished")

    assert list(retention.prune_due(layout, work, 30, now)) == ["b_old"]
    lines = [json.loads(line) for line in (work / retention.QUEUE).read_text().splitlines()]
    assert [entry["case"] for entry in lines] == ["a_newer"]
    assert lines[0]["finished"] == pytest.approx(now - 10 * DAY)


def test_a_case_no_longer_finished_leaves_the_queue(tmp_path: Path) -> None:
    """Reprocessed (its outputs moved aside) or archived: it is queued again when it finishes."""
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    now = time.time()
    record = finished_case(layout, "moved", finished=now - 40 * DAY)
    retention.enqueue(layout, work, "moved", finished=now - 40 * DAY)
    record["summary"].unlink()
    assert retention.prune_due(layout, work, 30, now) == {}
    assert (work / retention.QUEUE).read_text() == ""
    assert (layout.processing("moved") / "moqui_csv").is_dir()


def test_a_damaged_queue_names_the_file_and_the_line(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    (work / ".mqi").mkdir(parents=True)
    (work / retention.QUEUE).write_text('{"case": "a", "finished": 1}\n{"case": "b"\n{"case": "c", "fin')
    with pytest.raises(ValueError, match=r"retention-queue.jsonl, line 2"):
        retention.prune_due(layout, work, 30)
    # A last line cut short (a run killed while appending it) is not an entry yet, not an error.
    (work / retention.QUEUE).write_text('{"case": "a", "finished": 1}\n{"case": "c", "fin')
    assert retention.prune_due(layout, work, 30) == {}  # "a" is not finished: it leaves the queue
    assert (work / retention.QUEUE).read_text() == ""


def test_a_run_prunes_at_most_its_share_oldest_first(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = tmp_path / "work"
    now = time.time()
    for number in range(5):
        finished_case(layout, f"c{number}", finished=now - (40 + number) * DAY)
    assert list(retention.prune_due(layout, work, 30, now, limit=2)) == ["c4", "c3"]
    assert list(retention.prune_due(layout, work, 30, now, limit=2)) == ["c2", "c1"]
    assert list(retention.prune_due(layout, work, 30, now, limit=2)) == ["c0"]


def test_retention_days_from_the_config() -> None:
    assert retention.retention_days(settings.validate({})) == 30
    assert retention.retention_days(settings.validate({"retention": {"intermediates_days": 0}})) == 0
    assert retention.retention_days(settings.validate({"retention": {"intermediates_days": None}})) is None
    with pytest.raises(ValueError):
        settings.validate({"retention": {"intermediates_days": -1}})

"""`bin/mqi archive` without a Snakemake run: which cases may move, and what an archive interrupted
at each point leaves (the case whole at its origin or in DEST, never half). The move of a case a
real run finished, and status and the trend counting it: tests/test_workflow_retention.py."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mqi_communicator.ops import archive, state
from tests.test_retention import finished_case, layout_for
from tests.workflow import tree_digest

DAY = 86400.0


def origin_digest(layout: state.Layout, case: str) -> dict[str, dict[str, str]]:
    work = layout.logs_dir.parent
    return {
        "scan": tree_digest(layout.scan_dir / case),
        "outputs": tree_digest(work / "data" / "cases" / case),
        "logs": tree_digest(layout.logs_dir / case),
    }


def test_only_finished_cases_older_than_asked_move(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    now = time.time()
    finished_case(layout, "old", finished=now - 40 * DAY)
    finished_case(layout, "young", finished=now - 5 * DAY)
    changed = finished_case(layout, "changed", finished=now - 40 * DAY)
    (changed["summary"].parent / state.CHANGED).parent.mkdir(parents=True, exist_ok=True)
    (changed["summary"].parent / state.CHANGED).write_text(json.dumps({"files": ["a.ptn"]}))
    unfinished = finished_case(layout, "unfinished", finished=now - 40 * DAY)
    unfinished["summary"].unlink()

    assert archive.due(layout, 30, now) == ["changed", "old"]
    assert archive.refusal(layout, "old") is None
    assert "changed after it finished" in str(archive.refusal(layout, "changed"))
    assert archive.refusal(layout, "unfinished") == "not finished"
    with pytest.raises(ValueError, match="case unfinished is not archived: not finished"):
        archive.archive_case(layout, layout.logs_dir.parent, "unfinished", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()

    code = archive.main(
        [
            str(tmp_path / "dest"),
            "--older-than",
            "30",
            "--workdir",
            str(layout.logs_dir.parent),
            "--configfile",
            str(write_site(tmp_path)),
        ]
    )
    assert code == 1  # "changed" refused, named on stderr
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["old"]
    assert (layout.scan_dir / "changed").is_dir() and (layout.scan_dir / "young").is_dir()


def write_site(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "site.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"paths": {"local": {"scan_directory": str(tmp_path / "scan")}}}))
    return path


def test_a_copy_left_by_an_archive_stopped_before_its_rename_is_discarded(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = layout.logs_dir.parent
    finished_case(layout, "done", finished=time.time() - 40 * DAY)
    before = origin_digest(layout, "done")
    dest = tmp_path / "dest"
    partial = dest / f"{archive.PARTIAL}done" / "scan"
    partial.mkdir(parents=True)
    (partial / "half-copied.ptn").write_bytes(b"\0" * 10)  # what a killed copy leaves

    code = archive.main(
        [str(dest), "--older-than", "30", "--workdir", str(work), "--configfile", str(write_site(tmp_path))]
    )

    assert code == 0
    assert sorted(p.name for p in dest.iterdir()) == ["done"]
    assert tree_digest(dest / "done" / "scan") == before["scan"]
    assert tree_digest(dest / "done" / "outputs" / "data" / "cases" / "done") == before["outputs"]
    assert tree_digest(dest / "done" / "outputs" / "logs" / "done") == before["logs"]
    assert not (layout.scan_dir / "done").exists() and not (work / "data" / "cases" / "done").exists()
    index = archive.read_index(work)
    assert index["done"]["dest"] == str(dest / "done")


def interrupted_after_rename(layout: state.Layout, tmp_path: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """A case whole in DEST whose origin was not yet (all) removed: archived, then its origin put
    back as it was, and archive.json as it is before the origin's removal."""
    work = layout.logs_dir.parent
    finished_case(layout, "done", finished=time.time() - 40 * DAY)
    before = origin_digest(layout, "done")
    dest = tmp_path / "dest"
    archived = archive.archive_case(layout, work, "done", dest)
    shutil.copytree(archived / "scan", layout.scan_dir / "done", copy_function=shutil.copy2)
    shutil.copytree(archived / "outputs" / "data", work / "data", copy_function=shutil.copy2, dirs_exist_ok=True)
    (layout.scan_dir / "done" / layout.ready_marker).unlink()  # removed first: the run stopped after it
    manifest = json.loads((archived / archive.MANIFEST).read_text())
    del manifest["origin_removed"]
    (archived / archive.MANIFEST).write_text(json.dumps(manifest))
    return archived, before


def test_an_archive_stopped_after_its_rename_is_finished_by_the_next(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = layout.logs_dir.parent
    archived, before = interrupted_after_rename(layout, tmp_path)
    assert "done" not in state.targets(layout, lambda _: None)  # no ready marker: no run takes it

    assert archive.resume(layout, work, archived.parent) == ["done"]

    assert not (layout.scan_dir / "done").exists() and not (work / "data" / "cases" / "done").exists()
    assert tree_digest(archived / "scan") == {k: v for k, v in before["scan"].items()}
    assert json.loads((archived / archive.MANIFEST).read_text())["origin_removed"]
    assert archive.resume(layout, work, archived.parent) == []


def test_a_damaged_copy_in_dest_keeps_the_origin(tmp_path: Path) -> None:
    layout = layout_for(tmp_path)
    work = layout.logs_dir.parent
    archived, _ = interrupted_after_rename(layout, tmp_path)
    rtdose = archived / "outputs" / "data" / "cases" / "done" / "dicom" / "RD_2G90.dcm"
    rtdose.write_bytes(rtdose.read_bytes()[::-1])
    with pytest.raises(OSError, match=r"differs from its archive.json \(outputs/data/cases/done/dicom/RD_2G90.dcm\)"):
        archive.resume(layout, work, archived.parent)
    assert (work / "data" / "cases" / "done" / "dicom" / "RD_2G90.dcm").is_file()
    assert (layout.scan_dir / "done").is_dir()


def test_dest_inside_the_scan_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = layout_for(tmp_path)
    finished_case(layout, "done", finished=time.time() - 40 * DAY)
    site = write_site(tmp_path)
    dest = layout.scan_dir / "archive"
    code = archive.main(
        [str(dest), "--older-than", "30", "--workdir", str(layout.logs_dir.parent), "--configfile", str(site)]
    )
    assert code == 2 and "inside the scan folder" in capsys.readouterr().err
    assert not dest.exists() and (layout.scan_dir / "done" / layout.ready_marker).is_file()

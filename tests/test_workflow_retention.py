"""Retention through real Snakemake runs: a finished case aged past `retention.intermediates_days`
loses its intermediates in the next timer run and nothing else; it stays final (a dry run and a
real run have nothing to do, its record keeps every byte and time); `bin/mqi verify` and
`bin/mqi reprocess` work on it, the latter rebuilding what it needs from the case's inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from base64 import urlsafe_b64decode
from pathlib import Path

import pydicom

from mqi_communicator.ops import retention
from tests import casegen
from tests.workflow import REPO, full_log, snakemake, status_json, tree_digest, write_config

MQI = str(REPO / "bin" / "mqi")
REGENERABLE = re.compile(r"^(intermediate/moqui_csv/|intermediate/moqui/|raw/[^/]+_Dose\.raw$|raw/[^/]+\.moqui/)")


def planned_rules(text: str) -> set[str]:
    return set(re.findall(r"^rule (\w+):", text, re.MULTILINE))


def record_digest(work: Path, case: str) -> dict[str, str]:
    """Every file of the case's outputs and logs, but the regenerable intermediates."""
    outputs = {k: v for k, v in tree_digest(work / "data" / "cases" / case).items() if not REGENERABLE.match(k)}
    logs = {f"logs/{k}": v for k, v in tree_digest(work / "logs" / case).items()}
    return outputs | logs


def age_queue(work: Path, days: float) -> None:
    """The retention queue's times, `days` earlier (as if the cases had finished then)."""
    queue = work / retention.QUEUE
    lines = [json.loads(line) for line in queue.read_text().splitlines()]
    queue.write_text("".join(json.dumps(e | {"finished": e["finished"] - days * 86400}) + "\n" for e in lines))


def mqi(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MQI, *args, "--configfile", "test-config.yaml"], cwd=work, capture_output=True, text=True)


def dose_grid(path: Path) -> tuple[bytes, str]:
    ds = pydicom.dcmread(path)
    return ds.PixelData, str(ds.DoseGridScaling)


def test_a_pruned_case_stays_final_and_verify_and_reprocess_work_on_it(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "alpha")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)  # the default retention: 30 days
    first = snakemake(work)
    assert first.returncode == 0, first.stderr[-3000:]
    case = work / "data" / "cases" / "alpha"
    assert (case / "intermediate" / "moqui_csv").is_dir()  # not due yet
    record = record_digest(work, "alpha")
    assert any(k.startswith("dicom/RD_") for k in record) and "intermediate/qa/qa.json" in record

    # 31 days later: the next timer run removes the intermediates and does nothing else.
    age_queue(work, 31)
    run = snakemake(work)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "finished case alpha: intermediates removed" in run.stderr
    assert planned_rules(full_log(run)) <= {"all"}
    assert not (case / "intermediate" / "moqui_csv").exists() and not (case / "intermediate" / "moqui").exists()
    assert sorted(p.name for p in (case / "raw").iterdir()) == ["1G180_TX.simulate.json", "2G90.simulate.json"]
    after = record_digest(work, "alpha")
    pruned = after.pop("intermediate/state/pruned.json")
    assert after == record  # same bytes, same modification times
    assert (work / retention.QUEUE).read_text() == ""

    # Final: a dry run plans nothing, a real run does nothing, the record does not change.
    dry = snakemake(work, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert planned_rules(dry.stdout + dry.stderr) <= {"all"} and "cases/alpha/" not in dry.stdout + dry.stderr
    again = snakemake(work)
    assert again.returncode == 0 and planned_rules(full_log(again)) <= {"all"}
    # The report (finished cases enter its DAG) still builds from the record.
    report = snakemake(work, "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0 and (tmp_path / "report.html").is_file(), report.stderr[-2000:]
    assert record_digest(work, "alpha") == after | {"intermediate/state/pruned.json": pruned}

    # verify reads the inputs against intake's record: unchanged, changed, restored.
    assert mqi(work, "verify", "alpha").returncode == 0
    ptn = sorted(scan.glob("alpha/*/*.ptn"))[0]
    original = ptn.read_bytes()
    ptn.write_bytes(original[::-1])
    changed = mqi(work, "verify", "alpha")
    assert changed.returncode == 1 and ptn.name in changed.stdout, changed.stdout + changed.stderr
    ptn.write_bytes(original)
    assert mqi(work, "verify", "alpha").returncode == 0, "the same bytes again are no change"

    # reprocess from a step whose inputs were pruned: the next run rebuilds them from the case.
    again = mqi(work, "reprocess", "alpha", "--from", "rtdose")
    assert again.returncode == 0, again.stderr
    dry = snakemake(work, "--dry-run")
    assert {"interpret", "moqui_input", "simulate", "rtdose_beam"} <= planned_rules(dry.stdout), dry.stdout[-2000:]
    assert "intake" not in planned_rules(dry.stdout)  # its result was restored
    rerun = snakemake(work)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (case / "intermediate" / "case_summary.json").is_file()
    old_dicom = sorted(case.glob("dicom.superseded-*"))
    assert len(old_dicom) == 1, sorted(p.name for p in case.iterdir())
    for rd in sorted(old_dicom[0].glob("RD_*.dcm")):
        assert dose_grid(case / "dicom" / rd.name) == dose_grid(rd), rd.name  # the same dose, rebuilt
    # The case finished again: queued for retention again, due 30 days from now.
    queued = [json.loads(line) for line in (work / retention.QUEUE).read_text().splitlines()]
    assert [e["case"] for e in queued] == ["alpha"] and queued[0]["finished"] > time.time() - 600


def test_retention_zero_prunes_at_once_and_archive_moves_a_case_that_status_and_trend_still_count(
    tmp_path: Path,
) -> None:
    scan = tmp_path / "scan"
    for name in ("case001_G2", "case002_G1"):  # with TPS doses: assessed beams, trend points
        shutil.copytree(REPO / "sample_cases" / name, scan / name)
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, retention={"intermediates_days": 0})
    run = snakemake(work)
    assert run.returncode == 0, run.stderr[-3000:]
    cases = work / "data" / "cases"
    for case in ("case001_G2", "case002_G1"):  # pruned at the end of the run that finished them
        assert (cases / case / "intermediate" / "state" / "pruned.json").is_file()
        assert not (cases / case / "intermediate" / "moqui_csv").exists()
    ledger = work / "results" / "qa_history.jsonl"
    points = ledger.read_text()
    assert "case001_G2" in points and "case002_G1" in points
    old, kept = "case001_G2", "case002_G1"
    month_ago = time.time() - 40 * 86400
    os.utime(cases / old / "intermediate" / "case_summary.json", (month_ago, month_ago))
    scan_before, outputs_before = tree_digest(scan / old), tree_digest(cases / old)
    logs_before, kept_before = tree_digest(work / "logs" / old), tree_digest(cases / kept)
    metadata = work / ".snakemake" / "metadata"
    named = {urlsafe_b64decode(p.name).decode(): p.name for p in metadata.iterdir()}
    old_metadata = {name for path, name in named.items() if f"/{old}/" in path}
    assert old_metadata
    verdicts = {c["case_id"]: c["verdict"] for c in status_json(work)["cases"]}

    dest = tmp_path / "archive"
    archived = mqi(work, "archive", "--older-than", "30", str(dest))
    assert archived.returncode == 0, archived.stdout + archived.stderr
    assert f"case {old}: archived" in archived.stdout and kept not in archived.stdout

    # Gone from its origin, whole in DEST (same bytes, same times), with Snakemake's metadata.
    assert not (scan / old).exists() and not (cases / old).exists() and not (work / "logs" / old).exists()
    assert not any(f"/{old}/" in urlsafe_b64decode(p.name).decode() for p in metadata.iterdir())
    assert tree_digest(dest / old / "scan") == scan_before
    assert tree_digest(dest / old / "outputs" / "data" / "cases" / old) == outputs_before
    assert tree_digest(dest / old / "outputs" / "logs" / old) == logs_before
    assert {p.name for p in (dest / old / "snakemake-metadata").iterdir()} == old_metadata
    manifest = json.loads((dest / old / "archive.json").read_text())
    assert manifest["origin_removed"] and manifest["case"] == old
    assert tree_digest(cases / kept) == kept_before

    # Status counts it, with its verdict; the trend ledger keeps its points, and the trend drawn
    # from the ledger (as rule qa_trend does) still has them.
    report = status_json(work)
    assert report["total"] == 2
    entry = next(c for c in report["cases"] if c["case_id"] == old)
    assert entry["state"] == "archived" and entry["verdict"] == verdicts[old] and entry["log"] == str(dest / old)
    assert sorted(ledger.read_text().splitlines()) == sorted(points.splitlines())
    trend = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqi_communicator.qa.trend",
            "--ledger",
            str(ledger),
            "--history",
            "unused/*",
            "--figure",
            str(tmp_path / "t.png"),
            "--json",
            str(tmp_path / "t.json"),
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert trend.returncode == 0, trend.stderr
    cases_in_trend = {
        p["case_id"] for s in json.loads((tmp_path / "t.json").read_text())["strata"].values() for p in s["points"]
    }
    assert old in cases_in_trend and kept in cases_in_trend

    # Nothing for the runs to do; a second archive finds nothing older.
    dry = snakemake(work, "--dry-run")
    assert dry.returncode == 0 and planned_rules(dry.stdout + dry.stderr) <= {"all"}
    again = mqi(work, "archive", "--older-than", "30", str(dest))
    assert again.returncode == 0 and again.stdout == ""

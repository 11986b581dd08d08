"""A run killed at any point (SIGKILL of Snakemake's process group and everything it started, as
a power cut would) and then rerun (`--unlock`, then a plain run) ends with every final file
either byte-identical to an uninterrupted run's or redone with the same content; never
truncated, never trusted half-written (issue 10, finding 7).

Kill points: at least 20, at seeded random times over the length of an uninterrupted run, in
chains (kill, unlock, rerun killed again, ... until a run finishes), so they land in every step
(intake, P2, MOQUI input, engine, RT Dose, report figures and tables, summary) at a fraction of
the cost of one full rerun per kill."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import psutil
import pydicom

from tests import casegen
from tests.workflow import REPO, SNAKEMAKE, write_config

KILL_POINTS = 20
#: seconds after its start at which the first run is killed (before Snakemake has started a job)
EARLIEST_KILL_S = 0.3
SEED = 20261130
# Values that legitimately differ between two runs of the same job.
# Timings and times, and (in qa.json's provenance) the sha256 of our own RT Doses, whose UIDs are
# new whenever they are redone; the stat key (inode, mtime) P2 records with each file it wrote.
VOLATILE_KEYS = {"seconds", "written", "stat_key"}


def _start(work: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", str(work / "test-config.yaml"), *args]
    return subprocess.Popen(
        command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _run(work: Path, *args: str) -> int:
    return _start(work, *args).wait(timeout=600)


def _kill_everything(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL Snakemake's process group and every process it started (the engine runs in a
    session of its own, which a power cut would not spare either)."""
    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()


def _final_files(work: Path) -> dict[str, Path]:
    """The results. A case's `state/` is the run recorder's bookkeeping (a killed run may leave
    its `running.json`, which status reads as stale), not a result."""
    data = work / "data"
    return {
        str(p.relative_to(data)): p
        for p in sorted(data.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".tmp" and p.parent.name != "state"
    }


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {
            k: _strip(v)
            for k, v in value.items()
            if k not in VOLATILE_KEYS and not (k.endswith(".dcm") and "/dicom/RD_" in k)
        }
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _same_content(reference: Path, candidate: Path) -> bool:
    """Equal where a redone job may differ only in UIDs, dates and timings."""
    if reference.suffix == ".dcm":
        a, b = pydicom.dcmread(reference), pydicom.dcmread(candidate)
        return (
            np.array_equal(a.pixel_array, b.pixel_array)
            and a.DoseGridScaling == b.DoseGridScaling
            and a.SeriesDescription == b.SeriesDescription
            and a.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
            == b.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
        )
    if reference.suffix == ".json":
        return _strip(json.loads(reference.read_text())) == _strip(json.loads(candidate.read_text()))
    if reference.suffix == ".csv" and reference.parent.name == "report":
        rows = [list(csv.DictReader(io.StringIO(p.read_text()))) for p in (reference, candidate)]
        return _strip(rows[0]) == _strip(rows[1])
    if reference.suffix == ".html":
        # The QA sheet embeds its figures and the time it was written: redone, it must be whole
        # (qa.json beside it carries the numbers, compared above).
        return candidate.read_text().rstrip().endswith("</html>")
    if reference.suffix == ".pdf":
        # The PDF report, too, carries the time it was written: redone, it must be whole.
        data = candidate.read_bytes()
        return data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    if reference.suffix == ".png":
        return np.array_equal(matplotlib.image.imread(reference), matplotlib.image.imread(candidate))
    return False


def _case(scan: Path) -> None:
    spots = [casegen.grid_spots(10.0, 10.0), casegen.grid_spots(5.0, 5.0)]
    spec = casegen.CaseSpec(
        patient_id="KILL",
        beams=[casegen.BeamSpec(1, "A1", [150.0, 145.0], spots)],  # one beam: every step, a modest runtime
    )
    casegen.write_case(scan, "k1", spec)


def test_killed_at_random_points_then_rerun(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    _case(scan)
    work = tmp_path / "work"  # the same path every time: paths in the files stay the same
    work.mkdir()
    write_config(work, scan)

    started = time.monotonic()
    assert _run(work) == 0
    duration = time.monotonic() - started
    reference_dir = tmp_path / "reference"
    shutil.copytree(work / "data", reference_dir)
    reference = {name: reference_dir / name for name in _final_files(work)}
    assert len(reference) >= 10  # manifest, CSVs, parameter files, raws, records, RT Doses, report

    rng = np.random.default_rng(SEED)
    progress_at_kill: list[int] = []
    outcomes = {"identical": 0, "redone": 0, "chains": 0}
    while len(progress_at_kill) < KILL_POINTS:
        # A chain: from nothing, start a run and kill it at a random time; unlock and start again,
        # killed again at a random time, ... until a run ends before its kill time. Each kill
        # lands at a random point of what was still left to do.
        for name in ("data", "logs", ".snakemake"):
            shutil.rmtree(work / name, ignore_errors=True)
        outcomes["chains"] += 1
        while True:
            process = _start(work)
            # The first kill lands while Snakemake is still starting (nothing written yet): the
            # random points alone reach "nothing written" only when the machine is slow enough.
            point = EARLIEST_KILL_S if not progress_at_kill else float(rng.uniform(0.0, duration))
            try:
                returncode = process.wait(timeout=point)
            except subprocess.TimeoutExpired:
                _kill_everything(process)
                progress_at_kill.append(len(_final_files(work)) if (work / "data").exists() else 0)
                assert _run(work, "--unlock") == 0
                continue
            assert returncode == 0, f"a rerun after {len(progress_at_kill)} kills failed; see {work / 'logs'}"
            break
        final = _final_files(work)
        assert sorted(final) == sorted(reference), f"after {len(progress_at_kill)} kills"
        for name, path in reference.items():
            if path.read_bytes() == final[name].read_bytes():
                outcomes["identical"] += 1
            else:
                assert _same_content(path, final[name]), f"{name} differs (after {len(progress_at_kill)} kills)"
                outcomes["redone"] += 1
        leftovers = list((work / "data").rglob("*.tmp"))
        assert leftovers == [], f"temp files left after kills and a rerun: {leftovers}"

    # The kills landed before, during and after the steps: from nothing written to almost done.
    print(f"uninterrupted run {duration:.1f} s; files at each kill: {progress_at_kill}; {outcomes}")
    assert min(progress_at_kill) == 0 and max(progress_at_kill) >= len(reference) - 3
    assert len(set(progress_at_kill)) >= 6

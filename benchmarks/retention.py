"""What a finished clinical-size case keeps after retention, and what the timer run that prunes it costs.

    .venv/bin/python benchmarks/retention.py [--keep DIR] [--old-logs 40000]

A clinical-size case (3 treatment beams, 100 layers, ~40 MB of plan and logs: the case of
benchmarks/p2_interpret.py) is finished through the embedded default (plain `snakemake`, the
built-in engine), then aged past `retention.intermediates_days` (its retention queue entry set
31 days back) and one timer run is made. Printed: the bytes the case keeps against its RT Doses
(goal: <= RT Doses + 10 MB), the wall time of that run against a run with nothing to prune, that
every file of the record has the same sha256 before and after, and what compressing the
intermediates instead would have kept (the trade: docs/retention.md). With --old-logs N the timer
run is `bin/mqi-run` and finds N earlier Snakemake run logs too (the issue's whole scenario): the
run logs left are printed as well (goal <= 1,000).

`finished_clinical_case` and `timer_run_after_retention` are functions another benchmark can call
(e.g. with many old run logs laid out in the same work folder before the timer run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from results_log import recorded

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CASE = "bench"
MB = 1e6


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--configfile", "site.yaml", *args]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)


def finished_clinical_case(root: Path) -> Path:
    """A work folder in which the pipeline finished the clinical-size case `bench` (embedded default)."""
    from benchmarks.p2_interpret import clinical_case
    from tests.workflow import write_calibration_record

    scan, work = root / "scan", root / "work"
    work.mkdir(parents=True)
    clinical_case(scan)
    (work / "site.yaml").write_text(json.dumps({"paths": {"local": {"scan_directory": str(scan)}}}))
    write_calibration_record(work / "config" / "calibration.yaml")
    started = time.perf_counter()
    run = snakemake(work)
    if run.returncode != 0:
        raise SystemExit(f"the clinical case did not finish:\n{run.stderr[-3000:]}")
    print(f"clinical case finished through the embedded default in {time.perf_counter() - started:.0f} s", flush=True)
    return work


def case_files(work: Path, case: str = CASE) -> dict[str, Path]:
    """Every file the case has in the work folder: its outputs and its step logs."""
    roots = [work / "data" / "cases" / case, work / "logs" / case]
    return {str(p.relative_to(work)): p for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def age_queue(work: Path, days: float) -> None:
    from mqi_communicator.ops import retention

    queue = work / retention.QUEUE
    lines = [json.loads(line) for line in queue.read_text().splitlines()]
    queue.write_text("".join(json.dumps(e | {"finished": e["finished"] - days * 86400}) + "\n" for e in lines))


def compressed_size(paths: list[Path]) -> tuple[int, float]:
    """Bytes the files would keep compressed (zlib level 6, file by file), and the seconds it takes."""
    started = time.perf_counter()
    total = sum(len(zlib.compress(p.read_bytes(), 6)) for p in paths)
    return total, time.perf_counter() - started


def timer_run_after_retention(
    work: Path,
    case: str = CASE,
    days_past: float = 31,
    timer_run: Callable[[Path], subprocess.CompletedProcess[str]] = snakemake,
) -> dict[str, Any]:
    """Age the finished case past the default retention (30 days), make one timer run (by default
    a plain `snakemake` in `work`, as the embedded default's timer runs it; another benchmark may
    pass e.g. a `bin/mqi-run` call) and the same run again with nothing to prune; the figures."""

    before = case_files(work, case)
    rtdoses = sum(p.stat().st_size for k, p in before.items() if "/dicom/RD_" in k)
    bytes_before = sum(p.stat().st_size for p in before.values())
    regenerable = {k for k, p in before.items() if any(p.is_relative_to(r) for r in retention_paths(work, case))}
    record_before = {k: sha256(p) for k, p in before.items() if k not in regenerable}
    regenerable_bytes = sum(before[k].stat().st_size for k in regenerable)
    compressed, compress_s = compressed_size([before[k] for k in sorted(regenerable)])

    age_queue(work, days_past)
    started = time.perf_counter()
    run = timer_run(work)
    prune_run_s = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"the timer run failed:\n{run.stderr[-3000:]}")
    started = time.perf_counter()
    idle = timer_run(work)
    idle_run_s = time.perf_counter() - started
    assert idle.returncode == 0, idle.stderr[-2000:]

    after = case_files(work, case)
    bytes_after = sum(p.stat().st_size for p in after.values())
    record_after = {k: sha256(p) for k, p in after.items() if k in record_before}
    return {
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "rtdose_bytes": rtdoses,
        "regenerable_bytes": regenerable_bytes,
        "compressed_bytes": compressed,
        "compress_s": compress_s,
        "goal_met": bytes_after <= rtdoses + 10 * MB,
        "record_files": len(record_before),
        "record_identical": record_after == record_before and set(after) - set(before) <= {pruned_record(case)},
        "prune_run_s": prune_run_s,
        "idle_run_s": idle_run_s,
    }


def retention_paths(work: Path, case: str) -> list[Path]:
    from mqi_communicator import settings
    from mqi_communicator.ops import retention, state

    layout = state.Layout.from_config(settings.load_site(str(work / "site.yaml"), work), work)
    return retention.regenerable_paths(layout, case)


def pruned_record(case: str) -> str:
    return f"data/cases/{case}/intermediate/state/pruned.json"


def report(figures: dict[str, Any]) -> None:
    f = figures
    print(f"case before retention: {f['bytes_before'] / MB:.1f} MB (RT Doses {f['rtdose_bytes'] / MB:.2f} MB)")
    print(
        f"case after one timer run past the retention: {f['bytes_after'] / MB:.2f} MB; goal <= RT Doses + 10 MB"
        f" = {(f['rtdose_bytes'] + 10 * MB) / MB:.2f} MB: {'met' if f['goal_met'] else 'NOT MET'}"
    )
    print(
        f"intermediates removed: {f['regenerable_bytes'] / MB:.1f} MB; compressed instead (zlib 6) they would keep"
        f" {f['compressed_bytes'] / MB:.1f} MB ({f['compress_s']:.1f} s of CPU to compress)"
    )
    print(f"record: {f['record_files']} files, sha256 before == after: {'yes' if f['record_identical'] else 'NO'}")
    print(
        f"timer run that pruned: {f['prune_run_s']:.2f} s wall; the same run with nothing to prune:"
        f" {f['idle_run_s']:.2f} s (ratio {f['prune_run_s'] / f['idle_run_s']:.2f})"
    )


def runner(work: Path) -> subprocess.CompletedProcess[str]:
    """One `bin/mqi-run`, as the timer starts it, on the work folder (embedded default profile)."""
    env = {**os.environ, "MQI_WORKDIR": str(work), "MQI_PROFILE": "default"}
    command = [str(REPO / "bin" / "mqi-run"), "-s", str(REPO / "Snakefile"), "--configfile", "site.yaml"]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)


def with_old_run_logs(work: Path, count: int) -> dict[str, Any]:
    """The issue's whole scenario: the case aged past the retention and `count` earlier run logs
    (benchmarks/run_logs.py lays them out as a 5-minute timer leaves them), one `bin/mqi-run`;
    its wall time against the same run once nothing is left to prune, and the logs left."""
    from benchmarks.run_logs import write_old_logs

    runner(work)  # the runner's first run: its folders, byte-compiled files
    write_old_logs(work, count)
    os.sync()
    figures = timer_run_after_retention(work, timer_run=runner)
    figures["old_logs"] = count
    figures["logs_left"] = sum(1 for _ in os.scandir(work / ".snakemake" / "log"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work here and keep the folder (default: a temporary one)")
    parser.add_argument(
        "--old-logs",
        type=int,
        default=0,
        help="also lay out this many earlier run logs and make the timer run with bin/mqi-run (e.g. 40000)",
    )
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mqi-retention-"))
    try:
        work = finished_clinical_case(root)
        if args.old_logs:
            figures = with_old_run_logs(work, args.old_logs)
            report(figures)
            print(
                f"run logs: {figures['old_logs']:,} earlier; left after the timer run: {figures['logs_left']:,}"
                " (goal <= 1,000)"
            )
        else:
            report(timer_run_after_retention(work))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(recorded("retention", main))

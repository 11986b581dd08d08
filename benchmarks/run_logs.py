"""A timer run with a year of run logs behind it: the files left and the run's wall time.

    .venv/bin/python benchmarks/run_logs.py [--old-logs 40000] [--repeats 3] [--busy] [--dir DIR]

On a copy of the project (Snakefile, rules, config, profiles, report) with an empty scan folder,
one `bin/mqi-run` (MQI_PROFILE=default: the embedded default) with nothing to do, as the timer
starts it; first with no earlier run logs, then with `--old-logs` earlier Snakemake logs in
.snakemake/log/ (one every 5 minutes back from now, as a 5-minute timer leaves them, 1 in 100 of
a failed run, recorded as bin/mqi-run records them), then the next run. Prints the median wall
time of each, their ratios to the first (goal <= 1.2), and the files left in .snakemake/log after
the run that found the old logs (goal <= 1,000). The first run with old logs pays their removal
once (one unlink each: the filesystem's speed); the runs after it find at most run_logs_keep.
--busy keeps one core busy with another process meanwhile.

`measure(old_logs, repeats)` returns the figures, for other benchmarks (benchmarks/retention.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_log import recorded

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts")]
RUNNER = REPO / "bin" / "mqi-run"
PROJECT_FILES = ("Snakefile", "rules", "config", "profiles", "report")
TIMER_SECONDS = 300
# What a run with nothing to do leaves (673 bytes in the measurement).
NOTHING_TO_DO = "Assuming unrestricted shared filesystem usage.\nBuilding DAG of jobs...\nNothing to be done.\n" * 6


def project_copy(root: Path) -> Path:
    work = root / "project"
    work.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    (work / "sample_cases").mkdir()  # the default scan folder, empty: nothing to do
    return work


def write_old_logs(work: Path, count: int) -> None:
    """`count` earlier runs' logs, newest 5 minutes ago; every 100th a failed run's."""
    log_dir = work / ".snakemake" / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    failed = []
    for i in range(count):
        stamp = now - (i + 1) * TIMER_SECONDS
        name = time.strftime("%Y-%m-%dT%H%M%S", time.localtime(stamp)) + ".000000.snakemake.log"
        path = log_dir / name
        path.write_text(NOTHING_TO_DO)
        os.utime(path, (stamp, stamp))
        if i % 100 == 0:
            failed.append(name)
    (work / ".mqi").mkdir(exist_ok=True)
    (work / ".mqi" / "failed-run-logs.json").write_text(json.dumps({"logs": failed}))


def timer_run(work: Path) -> float:
    env = {**os.environ, "MQI_WORKDIR": str(work), "MQI_PROFILE": "default"}
    started = time.perf_counter()
    run = subprocess.run([str(RUNNER)], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"bin/mqi-run failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return seconds


def measure(old_logs: int = 40_000, repeats: int = 3, root_dir: Path | None = None) -> dict[str, float]:
    """Median wall time of a timer run with no earlier logs; of the first run that finds
    `old_logs` earlier logs (a fresh set, written to disk, before each); and of the run after it
    (the steady state: what retention left in place). Their ratios, the most files left in
    .snakemake/log, and the wall time of bin/mqi-run's housekeeping in the steady state.
    `root_dir`: the filesystem to measure on (default: the system's temporary folder)."""
    root = Path(tempfile.mkdtemp(prefix="mqi-run-logs-", dir=root_dir))
    log_dir = None
    try:
        work = project_copy(root)
        log_dir = work / ".snakemake" / "log"
        timer_run(work)  # warm-up: byte-compiled files, Snakemake's first-run folders
        plain, first, steady, left = [], [], [], []
        for _ in range(repeats):
            shutil.rmtree(log_dir, ignore_errors=True)
            os.sync()
            plain.append(timer_run(work))
        for _ in range(repeats):
            shutil.rmtree(log_dir, ignore_errors=True)
            write_old_logs(work, old_logs)
            os.sync()  # the history is on disk, as after months of runs
            first.append(timer_run(work))
            left.append(sum(1 for _ in os.scandir(log_dir)))
            os.sync()
            steady.append(timer_run(work))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mqi_communicator.ops.housekeeping", "--workdir", str(work)],
            capture_output=True,
            check=True,
        )
        housekeeping = time.perf_counter() - started
        return {
            "old_logs": old_logs,
            "without_s": statistics.median(plain),
            "first_s": statistics.median(first),
            "first_ratio": statistics.median(first) / statistics.median(plain),
            "steady_s": statistics.median(steady),
            "steady_ratio": statistics.median(steady) / statistics.median(plain),
            "files_left": max(left),
            "housekeeping_s": housekeeping,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-logs", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--dir", type=Path, help="measure on this folder's filesystem (default: the temporary folder)")
    args = parser.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        figures = measure(args.old_logs, args.repeats, args.dir)
    finally:
        if busy:
            busy.kill()
    print(
        f"timer run (embedded default, nothing to do), median of {args.repeats}, in {args.dir or tempfile.gettempdir()}"
        + (", one core kept busy" if args.busy else "")
        + f":\n  no earlier logs                               {figures['without_s']:.2f} s"
        f"\n  first run with {figures['old_logs']:,} earlier logs (prunes them) {figures['first_s']:.2f} s"
        f"   ratio {figures['first_ratio']:.2f}"
        f"\n  the run after it (the logs retention left)     {figures['steady_s']:.2f} s"
        f"   ratio {figures['steady_ratio']:.2f} (goal <= 1.2)"
        f"\n  files left in .snakemake/log after the first run: {figures['files_left']} (goal <= 1,000)"
        f"\n  bin/mqi-run's housekeeping after a run, logs in place: {figures['housekeeping_s']:.2f} s"
        " (wall, Python start-up included)"
    )


if __name__ == "__main__":
    sys.exit(recorded("run_logs", main))

"""A timer run with a year of run logs behind it: the files left and the run's wall time.

    .venv/bin/python benchmarks/run_logs.py [--old-logs 40000] [--repeats 3] [--busy]

On a copy of the project (Snakefile, rules, config, profiles, report) with an empty scan folder,
one `bin/mqi-run` (MQI_PROFILE=default: the embedded default) with nothing to do, as the timer
starts it; first with no earlier run logs, then with `--old-logs` earlier Snakemake logs in
.snakemake/log/ (one every 5 minutes back from now, as a 5-minute timer leaves them, 1 in 100 of
a failed run, recorded as bin/mqi-run records them). Prints the median wall time of each, their
ratio (goal <= 1.2), and the files left in .snakemake/log after the run (goal <= 1,000).
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


def measure(old_logs: int = 40_000, repeats: int = 3) -> dict[str, float]:
    """Median wall time of a timer run without and with `old_logs` earlier logs (a fresh set
    before each run), their ratio, and the most files left in .snakemake/log after a run."""
    root = Path(tempfile.mkdtemp(prefix="mqi-run-logs-"))
    try:
        work = project_copy(root)
        timer_run(work)  # warm-up: byte-compiled files, Snakemake's first-run folders
        plain = []
        for _ in range(repeats):
            shutil.rmtree(work / ".snakemake" / "log", ignore_errors=True)
            plain.append(timer_run(work))
        loaded, left = [], []
        for _ in range(repeats):
            shutil.rmtree(work / ".snakemake" / "log", ignore_errors=True)
            write_old_logs(work, old_logs)
            loaded.append(timer_run(work))
            left.append(sum(1 for _ in os.scandir(work / ".snakemake" / "log")))
        # The pruning alone, in this process (free of the run's start-up noise), and the
        # housekeeping command bin/mqi-run starts after every run, as wall time.
        from mqi_communicator.ops import retention_logs
        from mqi_communicator.settings import load_site

        policy = retention_logs.Policy.from_config(load_site(None, work))
        prune = []
        for _ in range(repeats):
            shutil.rmtree(work / ".snakemake" / "log", ignore_errors=True)
            write_old_logs(work, old_logs)
            started = time.perf_counter()
            retention_logs.prune_run_logs(work, policy)
            prune.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mqi_communicator.ops.housekeeping", "--workdir", str(work)],
            capture_output=True,
            check=True,
        )
        housekeeping = time.perf_counter() - started
        return {
            "prune_s": statistics.median(prune),
            "housekeeping_s": housekeeping,
            "old_logs": old_logs,
            "without_s": statistics.median(plain),
            "with_s": statistics.median(loaded),
            "ratio": statistics.median(loaded) / statistics.median(plain),
            "files_left": max(left),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-logs", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    args = parser.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        figures = measure(args.old_logs, args.repeats)
    finally:
        if busy:
            busy.kill()
    print(
        f"timer run (embedded default, nothing to do), median of {args.repeats}"
        + (", one core kept busy" if args.busy else "")
        + f":\n  no earlier logs        {figures['without_s']:.2f} s"
        f"\n  {figures['old_logs']:,} earlier logs   {figures['with_s']:.2f} s   ratio {figures['ratio']:.2f} (goal <= 1.2)"
        f"\n  files left in .snakemake/log after the run: {figures['files_left']} (goal <= 1,000)"
        f"\n  pruning {figures['old_logs']:,} logs alone (in-process): {figures['prune_s']:.3f} s"
        f"\n  bin/mqi-run's housekeeping after a run (disk guard, retention; 1,000 logs in place):"
        f" {figures['housekeeping_s']:.2f} s wall, Python start-up included"
    )


if __name__ == "__main__":
    main()

"""Per-job overhead of the SLURM deployment: trivial jobs through Snakemake + the slurm executor
(production profile profiles/hpc with the test-cluster overlay tests/profiles/hpc-test) against
the same workflow run locally.

    tests/infra/slurm/start-slurm.sh          # as root, once (the test cluster)
    .venv/bin/python benchmarks/slurm_overhead.py [--repeats 3] [--jobs 1 4]

Each job writes when its shell command started and ended; the script splits the wall time of a
Snakemake run into: start-up until the first job's command starts, the commands, and from the
last command's end until Snakemake exits (for SLURM: the status poll that notices it).
Prints medians over the repeats.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_log import recorded

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SNAKEFILE = """
localrules: all

rule all:
    input: expand("out/{beam}.txt", beam=range(config["jobs"]))

rule simulate:
    output: "out/{beam}.txt"
    resources: gpu=1
    shell: "date +%s.%N > {output}; date +%s.%N >> {output}"
"""
SLURM = ["--profile", str(REPO / "profiles/hpc"), "--profile", str(REPO / "tests/profiles/hpc-test")]
LOCAL = ["--executor", "local", "--cores", "4"]


def run_once(executor_args: list[str], jobs: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="mqi-slurm-bench-", dir=".") as tmp:
        workdir = Path(tmp)
        (workdir / "Snakefile").write_text(SNAKEFILE)
        command = [
            *("timeout", "-s", "INT", "-k", "30", "600", SNAKEMAKE),
            *executor_args,
            *("--workflow-profile", "none", "--config", f"jobs={jobs}", "--quiet", "all"),
        ]
        t0 = time.time()
        run = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
        t_end = time.time()
        if run.returncode != 0:
            sys.exit(f"snakemake failed:\n{run.stdout}\n{run.stderr}")
        stamps = [[float(x) for x in p.read_text().split()] for p in (workdir / "out").iterdir()]
    first_start = min(s[0] for s in stamps)
    last_end = max(s[1] for s in stamps)
    return t_end - t0, first_start - t0, t_end - last_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True, check=False).returncode:
        sys.exit("no SLURM cluster answers: start the test cluster with tests/infra/slurm/start-slurm.sh (root)")

    print(f"{'jobs':>4} {'where':>6} {'wall s':>7} {'to 1st job s':>12} {'last job to exit s':>18}")
    for jobs in args.jobs:
        walls: dict[str, float] = {}
        for name, executor_args in (("local", LOCAL), ("slurm", SLURM)):
            results = [run_once(executor_args, jobs) for _ in range(args.repeats)]
            wall, to_first, tail = (statistics.median(r[i] for r in results) for i in range(3))
            walls[name] = wall
            print(f"{jobs:>4} {name:>6} {wall:>7.1f} {to_first:>12.1f} {tail:>18.1f}")
        print(f"{jobs:>4} overhead of SLURM: {walls['slurm'] - walls['local']:.1f} s per run of {jobs} parallel job(s)")


if __name__ == "__main__":
    sys.exit(recorded("slurm_overhead", main))

"""Cost of a run against the number of cases already finished, and of a backlog of new cases.

    .venv/bin/python benchmarks/history.py history [--finished 10 1000 10000] [--repeats 3]
    .venv/bin/python benchmarks/history.py backlog [--cases 200]
    add --busy to keep one core busy with another process meanwhile

history: a scan folder with N finished cases plus 5 new ones. Finished cases are clones of one
case the pipeline really finished (every file hard-linked, the JSON files that name the case
rewritten), so they look to the pipeline exactly like its own. Prints the wall time of
`snakemake --dry-run`, of the timer run that processes the 5 new cases, and of `bin/mqi status`,
with the ratio to the smallest N measured in the same run (flat = 1.0).

backlog: N new small cases (two beams each) in one run; wall time, and the CPU time of the
Snakemake controller process against that of the jobs it ran (getrusage self / children).
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

from results_log import recorded  # benchmarks/, beside this file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# Runs Snakemake in this process's child and reports the controller's and its jobs' CPU apart,
# when it started, and the MQI_ environment its jobs got (benchmarks/end_to_end.py uses it too).
RUSAGE_WRAPPER = """
import json, os, resource, sys, time
started = time.time()
from snakemake.cli import main
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"started": started, "controller": me.ru_utime + me.ru_stime,
               "jobs": kids.ru_utime + kids.ru_stime, "rc": code,
               "env": {k: v for k, v in os.environ.items() if k.startswith("MQI_")}}, f)
sys.exit(code or 0)
"""


def write_config(work: Path, scan: Path) -> None:
    (work / "site.yaml").write_text(json.dumps({"paths": {"local": {"scan_directory": str(scan)}}}))


def snakemake(work: Path, *args: str, rusage: Path | None = None) -> subprocess.CompletedProcess[str]:
    common = ["-s", str(REPO / "Snakefile"), "--configfile", "site.yaml", *args]
    command = [sys.executable, "-c", RUSAGE_WRAPPER, str(rusage), *common] if rusage else [SNAKEMAKE, *common]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)


def timed(function, *args, **kwargs) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def new_cases(scan: Path, names: list[str]) -> None:
    from tests import casegen

    for name in names:
        casegen.write_case(scan, name)


def finished_template(root: Path) -> tuple[Path, Path]:
    """One case the pipeline really finished: (its scan folder, the work folder)."""
    scan, work = root / "scan", root / "work"
    work.mkdir(parents=True)
    new_cases(scan, ["template"])
    write_config(work, scan)
    run = snakemake(work)
    if run.returncode != 0:
        raise SystemExit(f"template run failed:\n{run.stderr[-3000:]}")
    return scan / "template", work


def clone_tree(source: Path, target: Path, old: str, new: str) -> None:
    """Hard-link every file; rewrite the JSON files that name the case; folders keep their
    modification times (as `rsync -a` would; a finished case's fraction watch compares them)."""
    folders = []
    for folder, _dirs, files in os.walk(source):
        folders.append(Path(folder))
        rel = Path(folder).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(folder) / name, target / rel / name
            if name.endswith(".json"):
                dst.write_text(src.read_text().replace(f"/{old}/", f"/{new}/").replace(f'"{old}"', f'"{new}"'))
                os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
            else:
                os.link(src, dst)
    for folder in reversed(folders):  # deepest first: filling a folder changed its parent's time
        times = folder.stat()
        os.utime(target / folder.relative_to(source), ns=(times.st_atime_ns, times.st_mtime_ns))


def add_finished(template_case: Path, template_work: Path, scan: Path, work: Path, names: list[str]) -> None:
    data = template_work / "data" / "cases" / "template"
    for name in names:
        clone_tree(template_case, scan / name, "template", name)
        clone_tree(data, work / "data" / "cases" / name, "template", name)
        clone_tree(template_work / "logs" / "template", work / "logs" / name, "template", name)


def status_time(work: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [str(REPO / "bin" / "mqi"), "status", "--configfile", "site.yaml"], cwd=work, check=True, capture_output=True
    )
    return time.perf_counter() - started


def history(counts: list[int], repeats: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="mqi-history-"))
    try:
        template_case, template_work = finished_template(root / "template")
        rows = []
        for count in counts:
            site = root / f"n{count}"
            scan, work = site / "scan", site / "work"
            work.mkdir(parents=True)
            write_config(work, scan)
            t0 = time.perf_counter()
            add_finished(template_case, template_work, scan, work, [f"done{i:05d}" for i in range(count)])
            print(f"{count} finished cases laid out in {time.perf_counter() - t0:.1f} s", flush=True)
            new_cases(scan, [f"new{i}" for i in range(5)])
            dry = []
            for _ in range(repeats):
                seconds, run = timed(snakemake, work, "--dry-run")
                assert run.returncode == 0, run.stderr[-2000:]
                assert "done0" not in run.stdout, "a finished case entered the DAG"
                dry.append(seconds)
            status = [status_time(work) for _ in range(repeats)]
            seconds, run = timed(snakemake, work)
            assert run.returncode == 0, run.stderr[-2000:]
            rows.append((count, statistics.median(dry), seconds, statistics.median(status)))
            shutil.rmtree(site)
        base = rows[0]
        print(f"\nmedians of {repeats}; ratio = against {base[0]} finished cases, same run")
        print(
            f"{'finished':>9} {'dry-run s':>10} {'ratio':>6} {'5 new s':>8} {'ratio':>6} {'status s':>9} {'ratio':>6}"
        )
        for count, dry_s, run_s, status_s in rows:
            print(
                f"{count:>9} {dry_s:>10.2f} {dry_s / base[1]:>6.2f} {run_s:>8.1f} {run_s / base[2]:>6.2f}"
                f" {status_s:>9.2f} {status_s / base[3]:>6.2f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def backlog(count: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="mqi-backlog-"))
    try:
        scan, work = root / "scan", root / "work"
        work.mkdir(parents=True)
        write_config(work, scan)
        new_cases(scan, [f"b{i:04d}" for i in range(count)])
        usage = root / "rusage.json"
        seconds, run = timed(snakemake, work, rusage=usage)
        assert run.returncode == 0, run.stderr[-3000:]
        cpu = json.loads(usage.read_text())
        jobs = run.stderr.count("Finished jobid")
        total = cpu["controller"] + cpu["jobs"]
        print(f"backlog of {count} new cases: {jobs} jobs in {seconds / 60:.1f} min wall")
        print(
            f"CPU: controller {cpu['controller'] / 60:.1f} min, jobs {cpu['jobs'] / 60:.1f} min;"
            f" controller share {100 * cpu['controller'] / total:.1f} % (goal <= 10 %)"
        )
        if count == 200:
            print(f"against 57 min for the same backlog before this change (issue 9): {57 * 60 / seconds:.2f}x faster")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("history")
    h.add_argument("--finished", type=int, nargs="+", default=[10, 1000, 10000])
    h.add_argument("--repeats", type=int, default=3)
    h.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    b = sub.add_parser("backlog")
    b.add_argument("--cases", type=int, default=200)
    b.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    args = parser.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        if args.command == "history":
            history(sorted(args.finished), args.repeats)
        else:
            backlog(args.cases)
    finally:
        if busy:
            busy.kill()


if __name__ == "__main__":
    sys.exit(recorded("history", main))

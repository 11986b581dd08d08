"""Ready -> verdict on the embedded default: one clinical case through one `snakemake` run.

    .venv/bin/python benchmarks/end_to_end.py [--repeats 3] [--busy] [--modes both|server|no-server] [--no-steps]

The clinical case of benchmarks/p2_interpret.py (3 treatment beams, 100 layers, ~2.5 M log
samples) is built once; each run copies it into a fresh scan folder and work folder, writes the
site config (scan folder only: everything else the shipped config/config.yaml, built-in engine)
and a current calibration record, drops `_CASE_READY` and runs ONE `snakemake` with the project's
Snakefile and its workflow profile (profiles/default: 2 cores, the run recorder), as a plain
`snakemake` in the project does. Measured: wall time from start to exit, the CPU time of the
Snakemake controller process and of the jobs (getrusage self / children, plus what the step
server's lines say its steps and its start-up used: they are not Snakemake's children), and the
controller's start-up (process start until the first job's log file appeared).

Modes, alternated run by run so that both see the same load: with the step server (the default
of a run; docs/end-to-end-speed.md) and without it (MQI_STEP_SERVER=off: every step its own
`python -m`). Per step: the step server's line per step of the last served run (MQI_STEP_TIMES),
and, unless --no-steps, every job's shell command from the Snakemake log of the last run run again
one after the other without the server, with its inputs in place.

--busy keeps one core busy with another process meanwhile (a busy loop). Each run of the benchmark
appends its figures to benchmarks/results/end_to_end.jsonl (results_log.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from history import RUSAGE_WRAPPER  # noqa: E402
from p2_interpret import clinical_case  # noqa: E402
from results_log import append_result  # noqa: E402

from tests.workflow import write_calibration_record  # noqa: E402

TARGET_IDLE_S, TARGET_BUSY_S = 4.0, 6.0


def run_once(template: Path, root: Path, server: bool) -> dict:
    """One fresh work folder, one `snakemake` from `_CASE_READY` to the case summary; with the
    step server (the default) or without (MQI_STEP_SERVER=off: every step its own `python -m`)."""
    scan, work = root / "scan", root / "work"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(template.parent, scan, symlinks=True)
    work.mkdir(parents=True)
    (work / "site.yaml").write_text(json.dumps({"paths": {"local": {"scan_directory": str(scan)}}}))
    write_calibration_record(work / "config" / "calibration.yaml")
    (scan / template.name / "_CASE_READY").write_text("")
    usage = root / "rusage.json"
    command = [sys.executable, "-c", RUSAGE_WRAPPER, str(usage), "-s", str(REPO / "Snakefile")]
    command += ["--configfile", "site.yaml"]
    steps_file = root / "steps.jsonl"
    env = {**os.environ, "MQI_STEP_TIMES": str(steps_file)}
    if not server:
        env["MQI_STEP_SERVER"] = "off"
    t0 = time.time()
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    summary = work / "data" / "cases" / template.name / "intermediate" / "case_summary.json"
    if run.returncode != 0 or not summary.exists():
        raise SystemExit(f"the run failed (rc {run.returncode}):\n{run.stderr[-4000:]}")
    cpu = json.loads(usage.read_text())
    verdict = json.loads((summary.parent / "qa" / "qa.json").read_text()).get("verdict")
    # Steps run by the server are its grandchildren, not Snakemake's children: their CPU is in
    # the lines the server wrote (and its own start-up's).
    served = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
    return {
        "server": server,
        "wall_s": wall,
        "controller_cpu_s": cpu["controller"],
        "jobs_cpu_s": cpu["jobs"] + sum(step["cpu_s"] for step in served),
        "served_steps": len([step for step in served if "rc" in step]),
        "first_job_s": first_job_start(work) - cpu["started"],
        "jobs": run.stderr.count("Finished jobid") or len(job_commands(work)),
        "verdict": verdict,
        "work": work,
        # The operational settings Snakemake gave its jobs (Snakefile `envvars:`), for the steps
        # run again one by one.
        "env": cpu["env"],
        "served": served,
    }


def snakemake_log(work: Path) -> str:
    logs = sorted((work / ".snakemake" / "log").glob("*.snakemake.log"))
    return logs[-1].read_text()


def first_job_start(work: Path) -> float:
    """When the first job started: the earliest job log's creation, as near as a file time goes
    (its shell redirect creates it as the job's first act)."""
    logs = [p for p in (work / "logs").rglob("*.log")]
    return min(p.stat().st_mtime for p in logs) if logs else float("nan")


def job_commands(work: Path) -> list[tuple[str, list[str], str]]:
    """(rule, outputs, shell command) of every job in the order Snakemake started them (its log,
    printshellcmds); jobs without a shell command (rule all) left out."""
    jobs = []
    rule, outputs = None, []
    for line in snakemake_log(work).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule, outputs = m.group(1), []
        elif rule and line.startswith("    output: "):
            outputs = line.removeprefix("    output: ").split(", ")
        elif rule and line.startswith("Shell command: ") and line != "Shell command: None":
            jobs.append((rule, outputs, line.removeprefix("Shell command: ")))
            rule = None
    return jobs


def step_breakdown(work: Path, env: dict[str, str]) -> list[dict]:
    steps = []
    for rule, outputs, command in job_commands(work):
        # A step refuses to overwrite some of its outputs (Snakemake removes them before a job).
        for output in outputs:
            path = work / output
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=work, env={**os.environ, **env}, check=False)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"step {rule} failed when run again (rc {done.returncode}): {command[:300]}")
        steps.append({"rule": rule, "wall_s": wall, "cpu_s": cpu})
    return steps


def by_rule(steps: list[dict]) -> dict[str, dict]:
    rules: dict[str, dict] = {}
    for step in steps:
        entry = rules.setdefault(step["rule"], {"n": 0, "wall_s": 0.0, "cpu_s": 0.0})
        entry["n"] += 1
        entry["wall_s"] += step["wall_s"]
        entry["cpu_s"] += step["cpu_s"]
    return rules


def served_by_step(served: list[dict]) -> dict[str, dict]:
    """The server's lines per step kind: module (and the report's subcommand)."""
    kinds: dict[str, dict] = {}
    for step in served:
        if "rc" not in step:
            kinds["(step server start-up)"] = {"n": 1, "wall_s": 0.0, "cpu_s": step["cpu_s"]}
            continue
        name = step["module"].removeprefix("mqi_communicator.")
        if step["argv"] and re.fullmatch(r"[a-z][a-z-]*", step["argv"][0]):  # a subcommand
            name += " " + step["argv"][0]
        entry = kinds.setdefault(name, {"n": 0, "wall_s": 0.0, "cpu_s": 0.0})
        entry["n"] += 1
        entry["wall_s"] += step["wall_s"]
        entry["cpu_s"] += step["cpu_s"]
    return kinds


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'step':<28} {'n':>3} {'wall s':>8} {'CPU s':>8}")
    for name, entry in rows.items():
        print(f"{name:<28} {entry['n']:>3} {entry['wall_s']:>8.2f} {entry['cpu_s']:>8.2f}")
    print(
        f"{'sum':<28} {sum(e['n'] for e in rows.values()):>3} {sum(e['wall_s'] for e in rows.values()):>8.2f}"
        f" {sum(e['cpu_s'] for e in rows.values()):>8.2f}"
    )


FIGURES = ("wall_s", "controller_cpu_s", "jobs_cpu_s", "first_job_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode")
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument(
        "--modes",
        choices=["both", "server", "no-server"],
        default="both",
        help="with the step server, without it (MQI_STEP_SERVER=off), or both alternated (default)",
    )
    parser.add_argument("--no-steps", action="store_true", help="skip running the steps again one by one")
    args = parser.parse_args()
    modes = {"both": [False, True], "server": [True], "no-server": [False]}[args.modes]
    root = Path(tempfile.mkdtemp(prefix="mqi-e2e-"))
    busy = None
    try:
        t0 = time.perf_counter()
        case = clinical_case(root / "template")
        (case / "_CASE_READY").unlink()
        print(f"case built in {time.perf_counter() - t0:.1f} s", flush=True)
        load_before = os.getloadavg()[0]
        if args.busy:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        runs: dict[bool, list[dict]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:  # alternated: both modes see the same load
                result = run_once(case, root / f"run{repeat}-{int(mode)}", mode)
                runs[mode].append(result)
                print(
                    f"run {repeat + 1} {'server   ' if mode else 'no server'}: {result['wall_s']:.2f} s wall,"
                    f" controller {result['controller_cpu_s']:.2f} CPU-s, jobs {result['jobs_cpu_s']:.2f} CPU-s,"
                    f" first job after {result['first_job_s']:.2f} s, {result['jobs']} jobs,"
                    f" {result['served_steps']} served, verdict {result['verdict']}",
                    flush=True,
                )
        last = runs[modes[0]][-1]
        steps = [] if args.no_steps else step_breakdown(last["work"], last["env"])
        load_after = os.getloadavg()[0]
    finally:
        if busy:
            busy.kill()
            busy.wait()
    try:
        record: dict = {"load": [round(load_before, 2), round(load_after, 2)], "repeats": args.repeats}
        target = TARGET_BUSY_S if args.busy else TARGET_IDLE_S
        for mode in modes:
            label = "server" if mode else "no_server"
            figures = {key: statistics.median(r[key] for r in runs[mode]) for key in FIGURES}
            print(
                f"\n{label}: median of {len(runs[mode])}{' (one core busy)' if args.busy else ''}:"
                f" {figures['wall_s']:.2f} s wall (target <= {target:.0f} s:"
                f" {'MET' if figures['wall_s'] <= target else 'MISSED'}),"
                f" CPU {figures['controller_cpu_s'] + figures['jobs_cpu_s']:.2f} s"
                f" (controller {figures['controller_cpu_s']:.2f}, jobs {figures['jobs_cpu_s']:.2f}),"
                f" controller start-up to first job {figures['first_job_s']:.2f} s"
            )
            record[label] = {
                "median": figures,
                "runs": [{k: v for k, v in r.items() if k not in ("work", "env", "served")} for r in runs[mode]],
            }
            if mode:
                served = served_by_step(runs[mode][-1]["served"])
                print_table("per step in the last run with the server (the server's wait4 of each step):", served)
                record[label]["per_step"] = served
        if steps:
            print_table("per step without the server, run again one after the other:", by_rule(steps))
            record["per_rule_run_again"] = by_rule(steps)
        print(f"\nappended to {append_result('end_to_end', record, busy=args.busy)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

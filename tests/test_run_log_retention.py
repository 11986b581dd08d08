"""Run-log retention (docs/disk-guard.md): bin/mqi-run's stop-time cancel still finds its run's
SLURM job name with 40,000 old Snakemake logs present (no shell glob over the folder), the runner
prunes Snakemake's run logs and keeps failed runs' logs longer, and rotates the file cron appends
its output to."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "bin" / "mqi-run"
DAY = 86400

# One job that waits until a release file appears (or `sleep` seconds pass), or fails on request.
# The run announces a SLURM run ID in its Snakemake log, as the slurm executor plugin does: the
# runner cancels the run's jobs by that name, found in this run's log.
SNAKEFILE = r"""
localrules: all

onstart:
    logger.info("SLURM run ID: " + config.get("run_id", "no-id"))

rule all:
    input: "out/b1.txt"

rule simulate:
    output: "out/{beam}.txt"
    params: sleep=config.get("sleep", 60), fail=config.get("fail", 0)
    shell:
        "[ {params.fail} = 0 ] || exit 3; touch started.txt; "
        "for i in $(seq {params.sleep}); do [ -e release ] && break; sleep 1; done; "
        "echo done > {output}"
"""
# scancel as a stand-in: records how it was called (no SLURM needed to see what the runner cancels).
SCANCEL = '#!/bin/sh\necho "$@" >> "$SCANCEL_RECORD"\n'


def workflow(tmp_path: Path, retention: dict | None = None) -> tuple[Path, dict[str, str]]:
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    if retention:
        (workdir / "config").mkdir()
        (workdir / "config" / "config.yaml").write_text(yaml.safe_dump({"retention": retention}))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.yaml").write_text("executor: local\ncores: 1\nlatency-wait: 1\n")
    standins = tmp_path / "standins"
    standins.mkdir()
    (standins / "scancel").write_text(SCANCEL)
    (standins / "scancel").chmod(0o755)
    env = {
        **os.environ,
        "MQI_WORKDIR": str(workdir),
        "MQI_PROFILE": str(tmp_path / "local"),
        "PATH": f"{standins}:{os.environ['PATH']}",
        "SCANCEL_RECORD": str(tmp_path / "scancel.calls"),
    }
    return workdir, env


def old_run_logs(workdir: Path, count: int, newest_age_days: float, spacing_s: float, run_id: str) -> list[Path]:
    """`count` earlier runs' Snakemake logs, one every `spacing_s` seconds back from
    `newest_age_days` ago, named as Snakemake names them (start time), each naming a SLURM run."""
    log_dir = workdir / ".snakemake" / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    newest = time.time() - newest_age_days * DAY
    paths = []
    for i in range(count):
        stamp = newest - i * spacing_s
        name = time.strftime("%Y-%m-%dT%H%M%S", time.localtime(stamp)) + f".{i % 1000000:06d}.snakemake.log"
        path = log_dir / name
        path.write_text(f"Building DAG of jobs...\nSLURM run ID: {run_id}\nNothing to be done.\n")
        os.utime(path, (stamp, stamp))
        paths.append(path)
    return paths


def run_logs(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / ".snakemake" / "log").iterdir())


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.1)


def test_stop_time_cancel_finds_this_runs_job_name_among_40000_old_logs(tmp_path: Path) -> None:
    workdir, env = workflow(tmp_path)
    # More names than one argument list holds (ARG_MAX 2 MiB): `ls .snakemake/log/*` would fail.
    old = old_run_logs(workdir, 40_000, newest_age_days=0.01, spacing_s=300, run_id="an-old-run")
    assert sum(len(str(p.relative_to(workdir))) + 1 for p in old) > os.sysconf("SC_ARG_MAX")
    runner = subprocess.Popen(
        ["timeout", "-s", "INT", "-k", "60", "240", str(RUNNER), "--config", "run_id=this-run", "sleep=120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(workdir / "started.txt", 120)
        os.kill(runner.pid, signal.SIGTERM)  # timeout relays it to mqi-run: a systemd stop
        out, _ = runner.communicate(timeout=180)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert "sending SIGINT to Snakemake" in out, out
    assert "cancelling any job of this run (SLURM job name this-run)" in out, out
    calls = (tmp_path / "scancel.calls").read_text().splitlines()
    # At once on the stop and again when Snakemake exited; never an earlier run's jobs.
    assert calls and set(calls) == {"--name=this-run"}, calls
    assert not (workdir / "out" / "b1.txt").exists()

    # The same run pruned the history: the old logs were older than 14 days or beyond the newest
    # 1,000 (config defaults); this stopped run's log is kept, as a failed run's.
    left = run_logs(workdir)
    assert len(left) == 1000, len(left)
    failed = json.loads((workdir / ".mqi" / "failed-run-logs.json").read_text())["logs"]
    assert len(failed) == 1 and failed[0] in left
    assert "SLURM run ID: this-run" in (workdir / ".snakemake" / "log" / failed[0]).read_text()
    # Pruned beside the run (a stop signal may end that prune midway, unprinted), then after it:
    # the last prune leaves the newest 1,000, this stopped run's among them as a failed run's.
    removed = [int(n) for n in re.findall(r"^run logs: (\d+) removed", out, re.M)]
    assert removed and sum(removed) <= 39001, out
    assert re.findall(r"^run logs: .*$", out, re.M)[-1].endswith("1000 kept (1 of failed runs)"), out


def test_pruning_keeps_failed_runs_logs_longer(tmp_path: Path) -> None:
    workdir, env = workflow(tmp_path, retention={"run_logs_days": 14, "failed_run_logs_days": 90, "run_logs_keep": 6})
    runs = [
        subprocess.run([str(RUNNER), "--config", f"fail={fail}", "sleep=0"], env=env, capture_output=True, text=True)
        for fail in (1, 0)  # a failed run, then a good one
    ]
    assert runs[0].returncode != 0 and runs[1].returncode == 0, runs[0].stdout + runs[1].stdout
    failed = json.loads((workdir / ".mqi" / "failed-run-logs.json").read_text())["logs"]
    failed_run_log, good_run_log = run_logs(workdir)
    assert failed == [failed_run_log]
    by_age = {age: old_run_logs(workdir, 1, age, 0, f"run-{age}")[0] for age in (1, 2, 3, 5, 20, 30, 60, 100)}

    # Earlier failures as the runner records them: runs 20, 60 and 100 days ago failed.
    record = workdir / ".mqi" / "failed-run-logs.json"
    names = [*failed, *(by_age[age].name for age in (20, 60, 100))]
    record.write_text(json.dumps({"logs": names}))
    # Successful and within 14 days: ages 1, 2, 3, 5, the good run and the next one (6); failed
    # and within 90 days: 20, 60 and the failed run (3). At most 6 stay: failed runs' logs first,
    # then the newest successful ones (the next run's, the good run's, 1 day); 2, 3 and 5 go, and
    # by age 30 (successful) and 100 (failed).
    run = subprocess.run([str(RUNNER), "--config", "sleep=0"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    expected = {by_age[age].name for age in (1, 20, 60)} | {failed_run_log, good_run_log}
    left = set(run_logs(workdir))
    newest = left - expected - {p.name for p in by_age.values()}
    assert len(newest) == 1  # this run's own log, always kept
    assert left == expected | newest, sorted(left)
    # The failed run 100 days ago was past failed_run_logs_days; its record entry left with it.
    kept_failed = json.loads(record.read_text())["logs"]
    assert sorted(kept_failed) == sorted([failed_run_log, by_age[20].name, by_age[60].name])


def test_the_runner_rotates_the_log_cron_appends_to(tmp_path: Path) -> None:
    workdir, env = workflow(tmp_path, retention={"runner_log_max_mb": 0.001, "runner_log_keep": 2})
    log = workdir / "logs" / "mqi-run.log"
    log.parent.mkdir()
    for run in range(4):
        # As the cron line does: `bin/mqi-run >> logs/mqi-run.log 2>&1`
        with open(log, "a") as out:
            out.write(f"--- run {run}\n" + "x" * 1500 + "\n")
            out.flush()
            done = subprocess.run([str(RUNNER), "--config", "sleep=0"], env=env, stdout=out, stderr=out)
        assert done.returncode == 0
    rotated = sorted(p.name for p in log.parent.iterdir())
    # Each run's file is over 1 kB: rotated after the run; at most 2 old ones kept.
    assert rotated == ["mqi-run.log.1", "mqi-run.log.2"], rotated
    # The runner went on writing into the file it had open: its last lines are in .1, not lost.
    last = (log.parent / "mqi-run.log.1").read_text()
    assert last.startswith("--- run 3\n") and "Snakemake exited with status 0" in last


def test_retention_cli_names_a_bad_configuration(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump({"retention": {"run_logs_keep": 0}}))
    run = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.ops.retention_logs", "--workdir", str(tmp_path), "prune"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "retention.run_logs_keep" in run.stderr, run.stderr


def test_status_index_forgets_a_case_moved_away(tmp_path: Path) -> None:
    """`.mqi/status-index.json` (a finished case's summary facts) stays the size of the scan folder."""
    scan = tmp_path / "scan"
    for case in ("kept", "archived"):
        (scan / case).mkdir(parents=True)
        (scan / case / "_CASE_READY").touch()
        summary = tmp_path / "data" / "cases" / case / "intermediate" / "case_summary.json"
        summary.parent.mkdir(parents=True)
        summary.write_text(json.dumps({"case_id": case}))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({"paths": {"local": {"scan_directory": str(scan)}}}))
    status = [sys.executable, "-m", "mqi_communicator.ops.status", "--configfile", "site.yaml", "--json", "--all"]
    index = tmp_path / ".mqi" / "status-index.json"

    def finished() -> list[str]:
        run = subprocess.run([*status, "--workdir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return sorted(c["case_id"] for c in json.loads(run.stdout)["cases"] if c["state"] == "finished")

    assert finished() == ["archived", "kept"]
    assert sorted(json.loads(index.read_text())) == ["archived", "kept"]
    (scan / "archived").rename(tmp_path / "archived")  # moved away, e.g. archived
    assert finished() == ["kept"]
    assert sorted(json.loads(index.read_text())) == ["kept"]

"""bin/mqi-run, the unattended runner, on throwaway workflows (MQI_WORKDIR) and profiles
(MQI_PROFILE): never two runs at once, stale Snakemake locks cleared, SIGTERM cancels the SLURM
jobs of the run; and bin/mqi-install-timer's output where systemd is absent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.infra.slurm_fixture import SlurmCluster, active_jobs

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "bin" / "mqi-run"
INSTALL_TIMER = REPO / "bin" / "mqi-install-timer"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# One job that records where it started (and its pid), then waits until a release file appears or
# `sleep` seconds pass. `simulate` is named like the project's GPU step: profiles/hpc sends it to
# the gpu partition.
SNAKEFILE = r"""
localrules: all

rule all:
    input: "out/b1.txt"

rule simulate:
    output: "out/{beam}.txt"
    resources: gpu=1
    params: sleep=config.get("sleep", 120)
    shell:
        "echo $$ ${{SLURM_JOB_ID:-local}} > started.txt; "
        "for i in $(seq {params.sleep}); do [ -e release ] && break; sleep 1; done; "
        "echo done > {output}"
"""
LOCAL_PROFILE = "executor: local\ncores: 1\nlatency-wait: 1\n"


def workflow(tmp_path: Path, local_profile: bool = False) -> tuple[Path, dict[str, str]]:
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    env = {**os.environ, "MQI_WORKDIR": str(workdir)}
    if local_profile:
        (tmp_path / "local").mkdir()
        (tmp_path / "local" / "config.yaml").write_text(LOCAL_PROFILE)
        env["MQI_PROFILE"] = str(tmp_path / "local")
    else:
        env["MQI_PROFILE"] = "hpc tests/profiles/hpc-test"
    return workdir, env


def start_runner(env: dict[str, str], *args: str, limit: int = 240) -> subprocess.Popen[str]:
    # timeout -s INT: on a hang the runner forwards the SIGINT, Snakemake cancels its jobs.
    return subprocess.Popen(
        ["timeout", "-s", "INT", "-k", "60", str(limit), str(RUNNER), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (orphans may be reaped late where PID 1 is no init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_second_invocation_exits_at_once_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    workdir, env = workflow(tmp_path, local_profile=True)
    runs = [start_runner(env, "--config", "sleep=60"), start_runner(env, "--config", "sleep=60")]
    try:
        wait_for(workdir / "started.txt", 60)  # one of them runs the job
        # The other one is already gone (or about to be), with status 0 and a message.
        deadline = time.monotonic() + 10
        while all(r.poll() is None for r in runs):
            assert time.monotonic() < deadline, "neither invocation exited while the other one ran"
            time.sleep(0.1)
        loser = next(r for r in runs if r.poll() is not None)
        winner = next(r for r in runs if r is not loser)
        out, _ = loser.communicate()
        assert loser.returncode == 0, out
        assert "another run holds" in out and "nothing to do" in out
        assert winner.poll() is None  # still running its job
        (workdir / "release").touch()
        out, _ = winner.communicate(timeout=60)
        assert winner.returncode == 0, out
        assert (workdir / "out" / "b1.txt").read_text() == "done\n"
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()


def test_stale_snakemake_lock_is_cleared(tmp_path: Path) -> None:
    workdir, env = workflow(tmp_path, local_profile=True)
    # A Snakemake killed with SIGKILL leaves .snakemake/locks behind.
    killed = subprocess.Popen(
        [SNAKEMAKE, "--profile", env["MQI_PROFILE"], "--config", "sleep=60"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(workdir / "started.txt", 60)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert list((workdir / ".snakemake" / "locks").iterdir())
    (workdir / "release").touch()

    run = subprocess.run(
        ["timeout", "-s", "INT", "-k", "30", "120", str(RUNNER), "--config", "sleep=60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "clearing stale Snakemake locks" in run.stdout
    assert (workdir / "out" / "b1.txt").read_text() == "done\n"


def test_sigterm_cancels_the_slurm_job_and_a_rerun_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    workdir, env = workflow(tmp_path)
    prefix = f"mqitest{uuid.uuid4().hex[:8]}"
    runner = start_runner(env, "--slurm-jobname-prefix", prefix, "--config", "sleep=120", limit=400)
    try:
        wait_for(workdir / "started.txt", 90)  # the job's shell command is running on the node
        job_pid, job_id = (workdir / "started.txt").read_text().split()
        assert job_id != "local"
        assert any(line.split()[1] == "RUNNING" for line in active_jobs(prefix))

        t0 = time.monotonic()
        os.kill(runner.pid, signal.SIGTERM)  # timeout relays it to mqi-run
        # The job is cancelled at once (scancel, by Snakemake and by the runner); Snakemake itself
        # exits only when its status poller wakes up (plugin back-off, up to 180 s), so the runner
        # may take longer.
        job_gone = process_gone = runner_exit = None
        while job_gone is None or process_gone is None or runner_exit is None:
            now = time.monotonic() - t0
            assert now < 240, (
                f"after 240 s: job gone {job_gone}, its process gone {process_gone}, runner exited {runner_exit}"
            )
            if job_gone is None and not active_jobs(prefix):
                job_gone = now
            if process_gone is None and not alive(int(job_pid)):
                process_gone = now
            if runner_exit is None and runner.poll() is not None:
                runner_exit = now
            time.sleep(0.2)
        out, _ = runner.communicate()
        print(
            f"SIGTERM -> SLURM job {job_id} out of squeue after {job_gone:.1f} s, its process gone after "
            f"{process_gone:.1f} s, runner exited after {runner_exit:.1f} s"
        )
        assert job_gone < 30 and process_gone < 30
        assert "sending SIGINT to Snakemake" in out, out
        # ... and the runner cancels the run's jobs itself at once, whatever Snakemake does (a
        # SIGINT that lands while Snakemake checks job status cancels nothing; it may exit later
        # than systemd's SIGKILL)
        assert f"cancelling any job of this run (SLURM job name {prefix}_" in out, out
        assert not (workdir / "out" / "b1.txt").exists()
    finally:
        if runner.poll() is None:
            runner.kill()

    # The next (timer) run starts cleanly and completes the job.
    (workdir / "started.txt").unlink()
    rerun = start_runner(env, "--slurm-jobname-prefix", prefix, "--config", "sleep=0")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert (workdir / "out" / "b1.txt").read_text() == "done\n"
    assert not active_jobs(prefix)


def test_install_timer_prints_the_cron_line_without_systemd(tmp_path: Path) -> None:
    env = {**os.environ, "MQI_SYSTEMD_RUNTIME_DIR": str(tmp_path / "no-systemd")}
    run = subprocess.run([str(INSTALL_TIMER)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    cron = [line for line in run.stdout.splitlines() if line.startswith("*")]
    assert cron == [f"* * * * * cd {REPO} && mkdir -p logs && bin/mqi-run >> logs/mqi-run.log 2>&1"], run.stdout


def test_install_timer_renders_units_for_this_project(tmp_path: Path) -> None:
    run = subprocess.run(
        [str(INSTALL_TIMER), "--print", "--interval", "90"], capture_output=True, text=True, timeout=30, check=False
    )
    assert run.returncode == 0, run.stderr
    assert f"ExecStart={RUNNER}" in run.stdout
    assert f"WorkingDirectory={REPO}" in run.stdout
    assert "OnUnitInactiveSec=90s" in run.stdout
    assert "KillMode=mixed" in run.stdout
    # The OnFailure= alert unit comes with them.
    assert "OnFailure=mqi-communicator-alert@%n.service" in run.stdout
    assert f"ExecStart={REPO}/bin/mqi-alert run-failed --unit %i" in run.stdout
    assert not re.search(r"@[A-Z]+@", run.stdout)  # every placeholder filled in

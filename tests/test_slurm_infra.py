"""The SLURM deployment against a real single-node SLURM (tests/infra/slurm): the production
profile profiles/hpc, with the test-cluster overlay tests/profiles/hpc-test, sends the GPU step to
the gpu partition with a GPU, as seen from inside the job. Uses a throwaway workflow, not the
project's."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from snakemake.cli import parse_args

from tests.infra.slurm_fixture import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
HPC = REPO / "profiles" / "hpc"
HPC_TEST = REPO / "tests" / "profiles" / "hpc-test"

# What a job reports about where it ran. `simulate` is named like the project's GPU step so that
# the production profile's `set-resources: simulate` applies to it.
THROWAWAY_SNAKEFILE = r"""
localrules: all

REPORT = 'echo "partition=${{SLURM_JOB_PARTITION:-none}} cuda=${{CUDA_VISIBLE_DEVICES:-unset}} jobid=${{SLURM_JOB_ID:-none}}"'

rule all:
    input: "out/simulate_b1.txt", "out/prepare.txt"

rule prepare:  # submitted like any non-local rule, no GPU
    output: "out/prepare.txt"
    shell: REPORT + " > {output}"

rule simulate:
    output: "out/simulate_{beam}.txt"
    resources: gpu=1
    shell: REPORT + " > {output}"
"""


def report(path: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for item in path.read_text().split())


def squeue_job(jobid: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", jobid, "-o", "%j|%k|%P"],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    )
    return out.stdout.strip().split("|")


def test_profile_resolution_and_gpu_request_style(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--profile hpc` works as written from the project root (the `hpc` link there), and so do
    `--workflow-profile hpc` and `--profile profiles/hpc`; the GPU step asks for `gpu`
    (→ --gpus=1), never `gpus` (the job fails)."""
    monkeypatch.chdir(REPO)
    _, args = parse_args(["--profile", "hpc"])
    assert args.executor == "slurm"
    assert args.latency_wait == 60  # profiles/default is layered on top but sets nothing hpc-specific
    assert args.jobs == 8 and args.keep_going and args.retries == 2
    _, args = parse_args(["-s", str(REPO / "Snakefile"), "--workflow-profile", "hpc"])
    assert args.executor == "slurm"
    assert args.latency_wait == 60  # profiles/default's 5 s would win if it were layered on top
    simulate = args.set_resources["simulate"]
    assert simulate["gpu"].value == 1
    assert "gpus" not in simulate
    _, args = parse_args(["--profile", str(HPC), "--workflow-profile", "none"])
    assert args.latency_wait == 60 and args.keep_going and args.rerun_incomplete and args.retries == 2


def test_cluster_has_cpu_and_gpu_partitions(slurm_cluster: SlurmCluster) -> None:
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%P %G %T"], capture_output=True, text=True, check=True, timeout=15)
    rows = {line.split()[0].rstrip("*"): line.split()[1:] for line in sinfo.stdout.splitlines()}
    assert {"cpu", "gpu"} <= rows.keys(), sinfo.stdout
    assert rows["gpu"][0].startswith("gpu:"), f"no GPU GRES on the gpu partition: {sinfo.stdout}"
    how = f"started in {slurm_cluster.start_seconds:.1f} s" if slurm_cluster.started_here else "reused"
    print(f"SLURM test cluster {how}: {sinfo.stdout.strip()}")


def test_gpu_rule_runs_on_gpu_partition_with_a_gpu(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(THROWAWAY_SNAKEFILE)
    prefix = f"mqitest{uuid.uuid4().hex[:8]}"
    # fmt: off
    command = [
        "timeout", "-s", "INT", "-k", "60", "240",
        SNAKEMAKE, "--profile", str(HPC), "--profile", str(HPC_TEST), "--workflow-profile", "none",
        "--slurm-jobname-prefix", prefix,
    ]
    # fmt: on
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=330, check=False)
    assert run.returncode == 0, run.stdout + run.stderr

    gpu_job = report(tmp_path / "out" / "simulate_b1.txt")
    assert gpu_job["partition"] == "gpu"
    assert gpu_job["cuda"].isdigit(), gpu_job  # a GPU was allocated: CUDA_VISIBLE_DEVICES=<index>
    # The controller's view of that job (kept for MinJobAge): name prefix and comment from the plugin.
    name, comment, partition = squeue_job(gpu_job["jobid"])
    assert name.startswith(f"{prefix}_")
    assert comment == "rule_simulate_wildcards_b1"
    assert partition == "gpu"
    cpu_job = report(tmp_path / "out" / "prepare.txt")
    assert cpu_job["partition"] == "cpu"  # the cluster's default partition
    assert cpu_job["cuda"] == "unset"
    # SLURM's own log of the successful job is kept (slurm-keep-successful-logs, slurm-logdir).
    slurm_log = tmp_path / "logs" / "slurm" / "rule_simulate" / "b1" / f"{gpu_job['jobid']}.log"
    assert slurm_log.is_file(), sorted(p.name for p in (tmp_path / "logs").rglob("*"))

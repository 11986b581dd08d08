"""The pipeline through a real SLURM cluster (`--profile hpc` + the test-cluster overlay): each
beam is a job on the gpu partition, everything else runs on the controller, the doses equal the
embedded default's, and a failing beam fails only its case."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.infra.slurm_fixture import SlurmCluster
from tests.workflow import (
    REPO,
    case_summaries,
    full_log,
    sample_scan_with_failing_case,
    snakemake,
    standin_copies,
    write_config,
)

HPC = ["--profile", str(REPO / "profiles" / "hpc"), "--profile", str(REPO / "tests" / "profiles" / "hpc-test")]
HPC += ["--workflow-profile", "none"]


def test_pipeline_on_slurm_matches_embedded_default(
    slurm_cluster: SlurmCluster, embedded_default_run: Path, tmp_path: Path
) -> None:
    scan = sample_scan_with_failing_case(tmp_path, "FAIL01")
    # One sample case and the failing one: what SLURM adds (jobs on the GPU partition, a failure
    # confined to its case, the retry) shows on 3 jobs as on 7; the cases' contents are checked
    # by the local runs. Every SLURM job costs a nested Snakemake and status polling.
    for other in ("case002_G1", "case003_plan_only"):
        shutil.rmtree(scan / other)
    work = tmp_path / "work"
    work.mkdir()
    # The engine: the built-in one behind the stand-in tps_env, which fails the beam named FAILS
    # in the run that is told to (the same raw doses otherwise).
    write_config(work, scan, executables={"moqui": str(standin_copies(tmp_path) / "tps_env_faulty")})

    # Before intake the GPU jobs are unknown; after intake and P2 the dry-run lists them with
    # their partition and GPU request.
    first = snakemake(work, *HPC, "--until", "interpret", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    dry = snakemake(work, *HPC, "--dry-run", timeout=300)
    listed = dry.stdout + dry.stderr
    assert listed.count("rule simulate:") == 3  # 2 beams of case001_G2, 1 failing
    assert "slurm_partition=gpu" in listed and "gpu=1" in listed

    run = snakemake(work, *HPC, timeout=900, env={"MQI_STANDIN_FAULTS": "FAILS:engine"})
    console = run.stdout + run.stderr
    assert run.returncode != 0  # the failing case
    failed = [
        line for line in console.splitlines() if line.startswith("case zz_failing FAILED at simulate beam FAILS:")
    ]
    assert len(failed) == 1 and failed[0].endswith("(log: logs/zz_failing/simulate_FAILS.log)"), console[-3000:]
    assert "cudaMalloc failed (stand-in)" in (work / "logs" / "zz_failing" / "simulate_FAILS.log").read_text()

    slurm = case_summaries(work)
    local = case_summaries(embedded_default_run)
    assert sorted(slurm) == ["case001_G2"]
    for case, summary in slurm.items():
        for beam, reference in zip(summary["beams"], local[case]["beams"], strict=True):
            assert beam["slurm_job"], f"{case} {beam['beam']} did not run as a SLURM job"
            # Same engine, same inputs: the same raw dose, bit for bit.
            assert beam["raw_sha256"] == reference["raw_sha256"]
        for record in (work / "data" / "cases" / case / "raw").glob("*.simulate.json"):
            data = json.loads(record.read_text())
            assert data["slurm_partition"] == "gpu" and data["cuda_visible_devices"] not in (None, "")
            assert data["gpu"] == 0  # SLURM's GPU is device 0 inside the job
    # Local rules ran on the controller; only simulate went to SLURM.
    assert "localrule" in full_log(run)
    slurm_logs = {p.parts[-3] for p in (work / "logs" / "slurm").rglob("*.log")}
    assert slurm_logs == {"rule_simulate"} or slurm_logs == {"simulate"}, slurm_logs

    # An engine failure is permanent: the next run skips the case and says why; once someone asks
    # for a retry, the run after redoes just the failed beam (now healthy) and finishes the case.
    skipped = snakemake(work, *HPC, "--dry-run")
    assert "skipping case zz_failing: simulate" in skipped.stdout + skipped.stderr
    asked = subprocess.run(
        [str(REPO / "bin" / "mqi"), "retry", "zz_failing", "--configfile", "test-config.yaml"], cwd=work, check=False
    )
    assert asked.returncode == 0
    retry = snakemake(work, *HPC, timeout=600)
    assert retry.returncode == 0, retry.stderr[-3000:]
    retried = full_log(retry)
    assert retried.count("rule simulate:") == 1 and "beam=FAILS" in retried
    assert "zz_failing" in case_summaries(work)
    nothing = snakemake(work, *HPC, "--dry-run")
    assert "Nothing to be done" in nothing.stdout + nothing.stderr

"""`--profile remote` end to end: the controller outside the cluster, a real OpenSSH server on
127.0.0.1 (key only, its own host key in a known_hosts file) whose user runs the real test SLURM.
The doses equal the embedded default's; a remote engine failure fails only its case."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from mqi_communicator.files import sha256_of
from mqi_communicator.remote import commands, connection
from tests.infra.slurm_fixture import SlurmCluster
from tests.infra.sshd_fixture import SshServer
from tests.workflow import REPO, case_summaries, sample_scan_with_failing_case, snakemake, write_config

REMOTE = ["--profile", str(REPO / "profiles" / "remote")]


def _ssh(server: SshServer, command: str) -> commands.CommandResult:
    with connection.connect(server.host, server.port, server.user, server.key, server.known_hosts) as conn:
        return commands.run(conn, command, timeout=60)


def _python_for(server: SshServer) -> str:
    """A Python that runs the built-in engine as the SSH server's (unprivileged) user.

    The project's venv Python may live where that user cannot go (pyenv under /root here), so
    the system Python runs the package with the venv's site-packages, which must be readable;
    the engine's compiled dependencies are CPython 3.11 ABI, like the venv."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    candidates = [
        sys.executable,
        f"env PYTHONPATH={site}:{REPO / 'scripts'} /usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
    ]
    for python in candidates:
        probe = f"cd /tmp && {python} -c 'import mqi_communicator.simulate.engine, scipy.ndimage'"
        if _ssh(server, probe).rc == 0:
            return python
    raise AssertionError(f"the SSH test user cannot run the built-in engine with any of {candidates}")


def test_remote_pipeline_matches_embedded_default(
    slurm_cluster: SlurmCluster, sshd_server: SshServer, embedded_default_run: Path, tmp_path: Path
) -> None:
    scan = sample_scan_with_failing_case(tmp_path, "FAIL02")
    work = tmp_path / "work"
    work.mkdir()
    base = f"~/mqi-e2e-{uuid.uuid4().hex[:8]}"
    assert _ssh(sshd_server, f"mkdir -p {base}/tps_env").rc == 0
    # The cluster's "MOQUI" is the stand-in tps_env (the built-in engine), run by the remote user;
    # the fault it is given hits the one beam named FAILS.
    standin = REPO / "tests" / "standins" / "tps_env_faulty"
    engine = f"env MQI_STANDIN_FAULTS=FAILS:engine {_python_for(sshd_server)} {standin}"
    write_config(
        work,
        scan,
        hpc_connection={
            "host": sshd_server.host,
            "port": sshd_server.port,
            "user": sshd_server.user,
            "ssh_key_path": str(sshd_server.key),
            "known_hosts_path": str(sshd_server.known_hosts),
            "connect_timeout_seconds": 10,
        },
        paths={
            "local": {"scan_directory": str(scan)},
            "hpc": {
                "base_dir": base,
                "tps_env_dir": f"{base}/tps_env",
                "output_csv_dir": f"{base}/Output_csv/{{case_id}}",
                "dose_raw_dir": f"{base}/Dose_raw/{{case_id}}",
            },
        },
        remote_slurm={"tps_env": engine, "partition": "gpu", "max_wait_seconds": 600},
        application={"polling_interval_seconds": 2},
    )
    run = snakemake(work, *REMOTE, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-3000:]  # the failing case
    assert "cudaMalloc failed (stand-in)" in (work / "logs" / "zz_failing" / "simulate_FAILS.log").read_text()

    remote = case_summaries(work)
    local = case_summaries(embedded_default_run)
    assert sorted(remote) == ["case001_G2", "case002_G1", "case003_plan_only"], log[-3000:]
    for case, summary in remote.items():
        for beam, reference in zip(summary["beams"], local[case]["beams"], strict=True):
            assert beam["slurm_job"], f"{case} {beam['beam']}: no SLURM job recorded"
            assert beam["raw_sha256"] == reference["raw_sha256"]  # same engine, same inputs, same bytes
    # Stage-in reported P2's recorded sha256 of each file (P2 hashed the bytes it wrote), each
    # the file's own; the beams' logFilePath files, hard links of P2's CSVs, were sent once and
    # are hard links on the cluster too.
    staged = json.loads(next(work.rglob("case001_G2/**/remote/stage_in.json")).read_text())["upload"]
    processing = Path(next(work.rglob("case001_G2/**/moqui_csv/p2_summary.json"))).parent.parent
    recorded = json.loads((processing / "moqui_csv" / "p2_summary.json").read_text())["files"]
    assert len(recorded) > 1
    for entry in recorded:
        assert staged["files"]["moqui_csv/" + entry["path"]] == entry["sha256"], entry["path"]
    for rel, digest in staged["files"].items():
        assert sha256_of(processing / rel) == digest, rel
    csv_bytes = sum(f.stat().st_size for f in (processing / "moqui_csv" / "log").rglob("*.csv"))
    assert staged["bytes_sent"] < 1.1 * csv_bytes  # not twice
    linked = _ssh(sshd_server, f"find {staged['remote']}/moqui -name '*.csv' -links 2 | wc -l")
    assert int(linked.stdout) == len(list((processing / "moqui").rglob("*.csv"))) > 0, linked.stderr
    # The case's files really went through the SSH server's user, and nothing is left queued.
    listing = _ssh(sshd_server, f"ls {base}/Dose_raw/case001_G2/1G180_TX")
    assert "1G180:TX_2_Dose.raw" in listing.stdout, listing.stderr
    mine = ["squeue", "-h", "-u", sshd_server.user]  # the SLURM tests may run meanwhile (as root)
    assert subprocess.run(mine, capture_output=True, text=True, check=False).stdout.strip() == ""
    for part in (work / "data").rglob("*.part"):
        raise AssertionError(f"partial file left: {part}")

    # An engine failure is permanent: skipped until someone asks for a retry (bin/mqi retry).
    skipped = snakemake(work, *REMOTE, "--dry-run")
    assert "skipping case zz_failing: remote_simulate" in skipped.stdout + skipped.stderr
    asked = subprocess.run(
        [str(REPO / "bin" / "mqi"), "retry", "zz_failing", "--configfile", "test-config.yaml"], cwd=work, check=False
    )
    assert asked.returncode == 0
    again = snakemake(work, *REMOTE, "--dry-run")
    planned = again.stdout + again.stderr
    # Only the failed case is pending; its beam is resubmitted (the record says failed).
    assert "case_id=zz_failing" in planned and "case_id=case001_G2" not in planned

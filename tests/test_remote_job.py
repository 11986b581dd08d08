"""mqi_communicator.remote.job (and beam, slurm, slurm_script, job_record) against a real OpenSSH server and a real single-node SLURM (no mocks).

The controller (this test process, or the CLI as a subprocess) connects as the sshd fixture's
unprivileged user and drives sbatch/squeue/scancel over SSH, exactly as from a workstation
outside the cluster. The "remote MOQUI" is a small bash tps_env written into the test user's
folder: it reads OutputDir, FakeSleep, FakeMode and FakeBeamName from the parameter file, sleeps,
then writes ``<FakeBeamName>_2_Dose.raw`` (1,280,000 bytes) or fails as asked. Remote and local
are the same machine, so the tests also look at the remote files directly on disk, and at the
queue with a local ``squeue`` (as root), independently of the code under test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mqi_communicator import settings
from mqi_communicator.remote import beam, commands, connection, errors, job, job_record, slurm, slurm_script, stage
from tests.infra.slurm_fixture import active_jobs

if TYPE_CHECKING:
    from tests.infra.slurm_fixture import SlurmCluster
    from tests.infra.sshd_fixture import SshServer

# Also registered in tests/conftest.py; naming them here keeps this module runnable on its own.
pytest_plugins = ["tests.infra.slurm_fixture", "tests.infra.sshd_fixture"]

REPO = Path(__file__).resolve().parents[1]
RAW_BYTES = 400 * 400 * 8

FAKE_TPS_ENV = r"""#!/bin/bash
# Stand-in for MOQUI's tps_env (tests only): same call, same output file name and log markers.
in=$1
get() { awk -v k="$1" 'tolower($1) == tolower(k) { sub(/^[^ \t]+[ \t]+/, ""); print; exit }' "$in"; }
out=$(get OutputDir)
name=$(get FakeBeamName)
mode=$(get FakeMode)
echo "fake tps_env: $in (cwd $(pwd))"
echo "env: SLURM_JOB_PARTITION=${SLURM_JOB_PARTITION:-none} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
sleep "$(get FakeSleep)"
case "$mode" in
fail)
    echo "FATAL ERROR: fake engine failure (mode fail)"
    exit 3
    ;;
noraw)
    echo "Total execution time: 0 s"
    exit 0
    ;;
esac
mkdir -p "$out"
head -c 1280000 /dev/urandom >"$out/${name}_2_Dose.raw"
echo "Simlulation finalizing.."
echo "Total execution time: $(get FakeSleep) s"
"""


@dataclass
class Remote:
    """The test user's side: a folder it owns, the fake tps_env, a prefix for job names."""

    sshd: SshServer
    base: Path
    tps_env: Path
    uid: int
    gid: int
    prefix: str

    def own(self, path: Path) -> None:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.chown(p, self.uid, self.gid)

    def beam(self, beam: str, *, sleep: float, mode: str = "ok") -> Path:
        """A beam folder with its parameter file; returns the parameter file."""
        folder = self.base / f"{beam}-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        param = folder / f"moqui_tps_{beam}.in"
        param.write_text(
            f"# test parameters\nGPUID 0\nBeamNumbers 2\nTwoCentimeterMode true\nOutputDir {folder / 'out'}\n"
            f"FakeSleep {sleep}\nFakeMode {mode}\nFakeBeamName {beam}\n"
        )
        self.own(folder)
        return param

    def cli(self, param: Path, local: Path, job: str, *extra: str) -> list[str]:
        """The CLI call for a beam (fastest polling)."""
        s = self.sshd
        return [
            sys.executable,
            "-m",
            "mqi_communicator.remote.job",
            *("--host", s.host, "--port", str(s.port), "--user", s.user),
            *("--key", str(s.key), "--known-hosts", str(s.known_hosts)),
            *("--remote-input", str(param), "--remote-workdir", str(param.parent / "job")),
            *("--tps-env", str(self.tps_env), "--moqui-dir", str(self.base)),
            *("--partition", "gpu", "--time-limit", "5", "--job-name", job),
            *("--record", str(local / "job.json"), "--result", str(local / "result.json")),
            *("--log", str(local / "simulate.log"), "--poll-min", "0.2", "--poll-max", "0.5"),
            *extra,
        ]


@pytest.fixture(scope="module")
def cluster(slurm_cluster: SlurmCluster, sshd_server: SshServer) -> Iterator[Remote]:
    sshd_server.ensure_running()
    user = pwd.getpwnam(sshd_server.user)
    # The SSH user must reach SLURM itself (client config in /etc/slurm, munge socket usable).
    with connection.connect(**sshd_server.connect_args()) as conn:
        for cmd in (["sinfo", "-h", "-o", "%P"], ["squeue", "-h", "-u", sshd_server.user]):
            res = commands.run(conn, cmd, timeout=30)
            if res.rc != 0 or (cmd[0] == "sinfo" and "gpu" not in res.stdout):
                pytest.fail(
                    f"the sshd test user cannot use SLURM over SSH ({cmd}): {res.stderr.strip()}", pytrace=False
                )
    base = sshd_server.remote_dir / f"remote-job-{uuid.uuid4().hex[:6]}"
    (base / "bin").mkdir(parents=True)
    tps_env = base / "bin" / "tps_env"
    tps_env.write_text(FAKE_TPS_ENV)
    tps_env.chmod(0o755)
    env = Remote(sshd_server, base, tps_env, user.pw_uid, user.pw_gid, f"mqi_t{uuid.uuid4().hex[:6]}")
    env.own(base)
    yield env
    for line in active_jobs(env.prefix):  # nothing of ours may stay queued
        subprocess.run(["scancel", line.split()[0]], check=False, timeout=30)


def job_name(env: Remote, beam: str) -> str:
    return f"{env.prefix}_{beam}_{uuid.uuid4().hex[:4]}"


def squeue_row(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%P|%j"], capture_output=True, text=True, timeout=15
    )
    if not out.stdout.strip():
        return {}
    state, partition, name = out.stdout.strip().split("|")
    return {"state": state, "partition": partition, "name": name}


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def running_job(record: Path) -> str:
    """Wait until the record holds a job id and squeue shows that job RUNNING; returns the id."""
    job_id = wait_for(lambda: (read_json(record) or {}).get("job_id"), 20, "the job id in the record")
    wait_for(lambda: squeue_row(job_id).get("state") == "RUNNING", 20, f"job {job_id} RUNNING")
    return str(job_id)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class QueueWatch:
    """Samples the queue every 0.1 s in a thread: the active jobs with a given name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_active = 0
        self.ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = [line for line in active_jobs(self.name) if line.split()[-1] == self.name]
            self.max_active = max(self.max_active, len(rows))
            self.ids.update(line.split()[0] for line in rows)
            self._stop.wait(0.1)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------------------------
# without a cluster


def spec(**overrides: Any) -> slurm_script.JobSpec:
    values: dict[str, Any] = {
        "beam": "B1",
        "remote_input": "/r/moqui/B1/moqui_tps_B1.in",
        "remote_output_dir": "/r/dose/B1",
        "remote_workdir": "/r/moqui/B1",
        "tps_env": "/opt/moqui/tps_env --flag",
        "moqui_dir": "/opt/moqui dir",
    }
    values.update(overrides)
    return slurm_script.JobSpec(**values)


def test_job_script_directives_and_quoting() -> None:
    text = slurm_script.render_job_script(spec(gpu_request="gpu", time_limit_min=30, account="proj"), "mqi-abc")
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "#SBATCH --job-name=mqi_B1",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus=1",
        "#SBATCH --time=30",
        "#SBATCH --output=/r/moqui/B1/B1.slurm.out",
        "#SBATCH --chdir=/r/moqui/B1",
        "#SBATCH --comment=mqi-abc",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --account=proj",
    ]
    assert "--gres=gpu:1" in slurm_script.render_job_script(spec(gpu_request="gres"), "t")
    assert "moqui_dir='/opt/moqui dir'" in text
    assert 'exec /opt/moqui/tps_env --flag "$input"' in text
    assert "rc_file=/r/moqui/B1/B1.rc" in text
    syntax = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    with pytest.raises(errors.RemoteJobError, match="gpu_request"):
        spec(gpu_request="gpus")
    with pytest.raises(errors.RemoteJobError, match="absolute"):
        spec(remote_output_dir="dose/B1")
    with pytest.raises(errors.RemoteJobError, match="spaces"):
        slurm_script.render_job_script(spec(partition="gpu fast"), "t")


def test_judge_reasons() -> None:
    s = spec()
    ok_rc = {"rc": "0", "job_id": "7"}
    log = "Total execution time: 1 s\n"
    assert beam.judge(beam.Outputs(ok_rc, log, [("B1_2_Dose.raw", 8)]), "7", s, "COMPLETED") == (
        "B1_2_Dose.raw",
        8,
        ["Total execution time:"],
    )
    cases = [
        ({}, log, [], "without writing"),
        ({"rc": "0", "job_id": "6"}, log, [("a_Dose.raw", 8)], "written by job '6'"),
        ({"rc": "3", "job_id": "7"}, "FATAL ERROR: x", [], r"exited with 3 \(log: \['FATAL ERROR', 'ERROR:'\]\)"),
        (ok_rc, "ERROR: bad\n", [("a_Dose.raw", 8)], "failure marker"),
        (ok_rc, log, [], "found none"),
        (ok_rc, log, [("a_Dose.raw", 8), ("b_Dose.raw", 8)], "exactly one"),
        (ok_rc, log, [("a_Dose.raw", 0)], "empty"),
    ]
    for rc, text, raws, reason in cases:
        with pytest.raises(errors.JobFailed, match=reason):
            beam.judge(beam.Outputs(rc, text, raws), "7", s, "COMPLETED")


# --------------------------------------------------------------------------------------------
# real sshd + SLURM


def test_success_end_to_end_and_reattach_to_finished(cluster: Remote, tmp_path: Path) -> None:
    param = cluster.beam("B1", sleep=2)
    name = job_name(cluster, "B1")
    t0 = time.time()
    proc = subprocess.Popen(cluster.cli(param, tmp_path, name), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        job_id = running_job(tmp_path / "job.json")
        seen = squeue_row(job_id)  # where it runs, as the queue says
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "simulate.log").read_text()
    assert seen == {"state": "RUNNING", "partition": "gpu", "name": name}

    result = json.loads((tmp_path / "result.json").read_text())
    assert result == json.loads(out)
    raw = param.parent / "out" / "B1_2_Dose.raw"
    assert result["job_id"] == job_id and result["slurm_state"] == "COMPLETED"
    assert result["partition"] == "gpu" and result["requested_partition"] == "gpu"
    assert result["cuda_visible_devices"].isdigit()  # the job's own environment: a GPU was allotted
    assert result["remote_raw"] == str(raw) and result["engine_output"] == "B1_2_Dose.raw"
    assert result["bytes"] == RAW_BYTES == raw.stat().st_size
    assert result["sha256"] == sha256(raw)
    assert result["beam_name"] == "B1" and result["beam_number"] == 2
    assert result["remote_input"] == str(param) and result["exit_code"] == 0
    assert result["seconds"] >= 2 and result["queue_seconds"] >= 0
    assert "Total execution time:" in result["success_markers"]
    assert result["attempts"] == 1 and result["reattached"] is False

    record = json.loads((tmp_path / "job.json").read_text())
    assert record["state"] == "succeeded" and record["job_id"] == job_id
    assert record["remote"]["engine_log"] == str(param.parent / "job" / "B1.log")
    assert not list((param.parent / "job").glob("*.part"))  # the script was uploaded atomically
    rc = (param.parent / "job" / "B1.rc").read_text()
    assert "rc=0\n" in rc and f"job_id={job_id}\n" in rc and "partition=gpu\n" in rc

    log = (tmp_path / "simulate.log").read_text()
    assert f"submitted job {job_id}" in log
    assert "===== engine log of job" in log and "fake tps_env:" in log and "Total execution time: 2 s" in log
    assert "SLURM_JOB_PARTITION=gpu" in log
    print(
        f"\nsubmit->start {result['queue_seconds']} s, engine {result['seconds']} s, CLI total {time.time() - t0:.2f} s"
    )

    # A rerun with the record of a finished job judges that job again: no new submission.
    (tmp_path / "result.json").unlink()
    again = subprocess.run(cluster.cli(param, tmp_path, name), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    result2 = json.loads((tmp_path / "result.json").read_text())
    assert result2["job_id"] == job_id and result2["reattached"] is True and result2["sha256"] == result["sha256"]
    assert f"re-attaching to job {job_id}" in again.stderr


def test_engine_failure_is_reported_and_resubmitted(cluster: Remote, tmp_path: Path) -> None:
    param = cluster.beam("B2", sleep=0, mode="fail")
    name = job_name(cluster, "B2")
    args = cluster.cli(param, tmp_path, name, "--gpu-request", "gres")
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert first.returncode == job.EXIT_FAILED, first.stderr
    assert "REMOTE JOB FAILED: engine exited with 3 (log: ['FATAL ERROR', 'ERROR:'])" in first.stderr
    assert not (tmp_path / "result.json").exists()
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["state"] == "failed" and record["slurm_state"] == "FAILED"
    assert "engine exited with 3" in record["reason"]
    log = (tmp_path / "simulate.log").read_text()
    assert "FATAL ERROR: fake engine failure" in log and "REMOTE JOB FAILED" in log
    assert "#SBATCH --gres=gpu:1" in (param.parent / "job" / "B2.sbatch").read_text()

    # failed -> a rerun submits a new job (and keeps the history)
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert second.returncode == job.EXIT_FAILED
    record2 = json.loads((tmp_path / "job.json").read_text())
    assert record2["job_id"] != record["job_id"]
    assert [a["job_id"] for a in record2["attempts"]] == [record["job_id"]]


def test_controller_killed_reattaches_without_second_job(cluster: Remote, tmp_path: Path) -> None:
    param = cluster.beam("B3", sleep=5)
    name = job_name(cluster, "B3")
    args = cluster.cli(param, tmp_path, name)
    with QueueWatch(name) as watch:
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        job_id = running_job(tmp_path / "job.json")
        proc.send_signal(signal.SIGKILL)  # a controller crash: no cleanup of any kind
        proc.wait(10)
        assert squeue_row(job_id)["state"] == "RUNNING"  # the job does not depend on the controller
        rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert f"re-attaching to job {job_id}" in rerun.stderr and "submitted job" not in rerun.stderr
    assert watch.ids == {job_id} and watch.max_active == 1  # exactly one job for the beam, ever
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["job_id"] == job_id and result["reattached"] is True and result["attempts"] == 1
    assert json.loads((tmp_path / "job.json").read_text())["attempts"] == []


def test_sigterm_cancels_the_job(cluster: Remote, tmp_path: Path) -> None:
    param = cluster.beam("B4", sleep=120)
    proc = subprocess.Popen(
        cluster.cli(param, tmp_path, job_name(cluster, "B4")),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = running_job(tmp_path / "job.json")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: squeue_row(job_id).get("state") not in ("RUNNING", "COMPLETING"), 10, "the job to stop")
        gone_s = time.monotonic() - t0
        _, err = proc.communicate(timeout=30)
        exit_s = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert squeue_row(job_id)["state"] == "CANCELLED"
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["state"] == "cancelled" and "SIGTERM" in record["reason"]
    assert f"cancelling job {job_id}" in err
    assert gone_s < 5
    print(f"\nSIGTERM -> job no longer running {gone_s:.2f} s, CLI exited {exit_s:.2f} s")


def test_max_wait_cancels_and_fails(cluster: Remote, tmp_path: Path) -> None:
    param = cluster.beam("B5", sleep=120)
    t0 = time.monotonic()
    run = subprocess.run(
        cluster.cli(param, tmp_path, job_name(cluster, "B5"), "--max-wait", "3"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert run.returncode == job.EXIT_FAILED, run.stderr
    record = json.loads((tmp_path / "job.json").read_text())
    assert "REMOTE JOB FAILED: job" in run.stderr and "after its submission (max wait" in run.stderr
    assert record["state"] == "cancelled" and "max wait" in record["reason"]
    assert squeue_row(record["job_id"])["state"] == "CANCELLED"
    assert elapsed < 20


def test_rule_interface_with_settings_and_stage_out(cluster: Remote, tmp_path: Path) -> None:
    """As rules/remote.smk calls it (--settings, --staged), then the lead's stage-out downloads the raw."""
    param = cluster.beam("B6", sleep=0)
    s = cluster.sshd
    config = {
        "deployment": "remote",
        "application": {"polling_interval_seconds": 1},
        "paths": {"hpc": {"tps_env_dir": str(cluster.tps_env.parent)}},
        "hpc_connection": {
            "host": s.host,
            "port": s.port,
            "user": s.user,
            "ssh_key_path": str(s.key),
            "known_hosts_path": str(s.known_hosts),
        },
        "remote_slurm": {"partition": "gpu", "gpu_request": "gpu", "max_wait_seconds": 60, "pseudonym_salt": "s3"},
        "simulation": {"timeout_seconds": 90},
    }
    staged = tmp_path / "stage_in.json"
    staged.write_text(
        json.dumps(
            {"case_id": "c1", "beams": {"B6": {"parameter_file": str(param), "output_dir": str(param.parent / "out")}}}
        )
    )
    args = [
        *(sys.executable, "-m", "mqi_communicator.remote.job", "--settings", json.dumps(config)),
        *("--staged", str(staged), "--beam", "B6", "--poll-min", "0.2"),
        *("--record", str(tmp_path / "B6.job.json"), "--result", str(tmp_path / "B6.remote.json")),
        *("--log", str(tmp_path / "simulate_B6.log")),
    ]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "B6.remote.json").read_text())
    script = (param.parent / "B6.sbatch").read_text()  # job files beside the parameter file
    # the queue shows a pseudonym, never the case id
    pseudonym = slurm_script.case_pseudonym("c1", "s3")
    assert f"#SBATCH --job-name=mqi_{pseudonym}_B6" in script and "#SBATCH --time=2" in script
    assert "c1" not in pseudonym and pseudonym != slurm_script.case_pseudonym("c1", "other salt")
    assert f"--comment={json.loads((tmp_path / 'B6.job.json').read_text())['token']}" in script
    assert f"moqui_dir={cluster.tps_env.parent}" in script
    assert result["tps_env"] == str(cluster.tps_env)
    # the stage-out rule's download, verified against the sha256 computed on the cluster
    local_raw = tmp_path / "B6_Dose.raw"
    record = stage.stage_out(
        settings.load(json.dumps(config)), tmp_path / "B6.remote.json", local_raw, tmp_path / "B6.simulate.json"
    )
    assert sha256(local_raw) == result["sha256"] and record["slurm_job_id"] == result["job_id"]
    assert record["slurm_partition"] == "gpu"
    # patient data stays private: what the job wrote on the cluster, and what came back here
    job_files = [param.parent / f"B6{suffix}" for suffix in (".sbatch", ".log", ".rc", ".slurm.out")]
    written = [*job_files, param.parent / "out", Path(result["remote_raw"])]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {
        **{p.name: "0o600" for p in job_files},
        "out": "0o700",
        Path(result["remote_raw"]).name: "0o600",
    }
    local = [local_raw, tmp_path / "B6.simulate.json", tmp_path / "B6.remote.json", tmp_path / "B6.job.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in local} == {"0o600"}


def test_killed_between_sbatch_and_record_finds_job_by_token(cluster: Remote, tmp_path: Path) -> None:
    """The narrowest window: sbatch went through, the controller died before recording the id."""
    param = cluster.beam("B7", sleep=1)
    name = job_name(cluster, "B7")
    with connection.connect(**cluster.sshd.connect_args()) as conn:
        gone = slurm.query(conn, slurm.JobRef("99999999"))  # not in squeue, no accounting here
        assert (gone.state, gone.active, gone.source) == (slurm.GONE, False, "none")
        spec = slurm_script.JobSpec(
            beam="B7",
            remote_input=str(param),
            remote_output_dir=str(param.parent / "out"),
            remote_workdir=str(param.parent / "job"),
            tps_env=str(cluster.tps_env),
            moqui_dir=str(cluster.base),
            time_limit_min=5,
            job_name=name,
        )
        token = "mqi-" + uuid.uuid4().hex[:16]
        record = job_record.new_record(spec, conn, token, None)
        script = slurm_script.write_job_script(conn, spec, token)
        job_record.save_record(tmp_path / "job.json", record)  # 'submitting', as before sbatch
        job_id = slurm.submit(conn, script)  # ... and the controller dies right here
    with QueueWatch(name) as watch:
        run = subprocess.run(cluster.cli(param, tmp_path, name), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"found job {job_id} of an interrupted submission" in run.stderr and "submitted job" not in run.stderr
    assert json.loads((tmp_path / "result.json").read_text())["job_id"] == job_id
    assert watch.ids <= {job_id}


def test_cluster_unreachable_keeps_the_job_for_a_rerun(cluster: Remote, tmp_path: Path) -> None:
    """The login node goes away while the job runs: exit 3, job and record intact; a rerun finishes."""
    param = cluster.beam("B8", sleep=5)
    name = job_name(cluster, "B8")
    fail_fast = ("--retries", "0", "--connect-timeout", "2", "--unreachable-limit", "1.5")
    proc = subprocess.Popen(
        cluster.cli(param, tmp_path, name, *fail_fast),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = running_job(tmp_path / "job.json")
        cluster.sshd.kill()  # listener and every session: connection refused from now on
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == job.EXIT_UNREACHABLE, err
        assert "REMOTE JOB UNREACHABLE" in err and "rerun to re-attach" in err
        record = json.loads((tmp_path / "job.json").read_text())
        assert record["job_id"] == job_id and record["state"] in ("submitted", "running")
        assert squeue_row(job_id)["state"] in ("RUNNING", "COMPLETING", "COMPLETED")  # never cancelled
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        cluster.sshd.ensure_running()
    rerun = subprocess.run(cluster.cli(param, tmp_path, name), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((tmp_path / "result.json").read_text())["job_id"] == job_id


def test_recorded_job_id_reused_by_another_job_is_never_touched(cluster: Remote, tmp_path: Path) -> None:
    """Job ids come back (e.g. after a SLURM state reset): a recorded id now carrying another job's
    comment is not ours: it is neither polled as ours nor cancelled; the beam fails and a rerun submits."""
    param = cluster.beam("B9", sleep=0)
    name = job_name(cluster, "B9")
    decoy_dir = param.parent / "decoy"
    decoy_dir.mkdir()
    (decoy_dir / "decoy.sh").write_text("#!/bin/bash\nsleep 60\n")
    cluster.own(decoy_dir)
    with connection.connect(**cluster.sshd.connect_args()) as conn:
        decoy_cmd = ["sbatch", "--parsable", "-p", "cpu", "-J", f"{name}_decoy", "--comment=someone-else"]
        decoy_cmd += ["-o", "/dev/null", "-D", str(decoy_dir), str(decoy_dir / "decoy.sh")]
        out = commands.run(
            conn,
            decoy_cmd,
            timeout=30,
            idempotent=False,
        )
        assert out.rc == 0, out.stderr
        decoy = out.stdout.strip()
        spec = slurm_script.JobSpec(
            beam="B9",
            remote_input=str(param),
            remote_output_dir=str(param.parent / "out"),
            remote_workdir=str(param.parent / "job"),
            tps_env=str(cluster.tps_env),
            moqui_dir=str(cluster.base),
            job_name=name,
        )
        record = job_record.new_record(spec, conn, "mqi-ours", None)
        record.update(state="running", job_id=decoy)
        job_record.save_record(tmp_path / "job.json", record)
    try:
        wait_for(lambda: squeue_row(decoy).get("state") == "RUNNING", 20, "the decoy job RUNNING")
        run = subprocess.run(
            cluster.cli(param, tmp_path, name, "--max-wait", "1"), cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == job.EXIT_FAILED, run.stderr
        assert "belongs to another job" in run.stderr
        assert squeue_row(decoy)["state"] == "RUNNING"  # not cancelled, even past the max wait
        assert json.loads((tmp_path / "job.json").read_text())["state"] == "failed"
        rerun = subprocess.run(cluster.cli(param, tmp_path, name), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads((tmp_path / "result.json").read_text())["job_id"] != decoy
    finally:
        subprocess.run(["scancel", decoy], check=False, timeout=30)

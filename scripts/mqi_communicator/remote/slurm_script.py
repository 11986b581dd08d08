"""The SLURM batch script of one beam: what it runs, where its files go, and how it reports.

The script runs ``cd <moqui_dir> && <tps_env> <beam.in> >> <engine log> 2>&1`` (after a header
line saying where it runs) under ``umask 077`` and writes the exit code, job id, token,
partition, node, visible GPUs and start/end times to ``<beam>.rc`` beside the log (temp +
rename), so the result is judged without ``sacct`` (clusters without slurmdbd).

Remote files of a beam (in the work dir): ``<beam>.sbatch`` (the script), ``<beam>.slurm.out``
(SLURM's --output), ``<beam>.log`` (engine stdout+stderr), ``<beam>.rc`` (``key=value`` lines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import posixpath
import re
import shlex
import tempfile
from pathlib import Path

from mqi_communicator.remote.commands import run
from mqi_communicator.remote.connection import Connection
from mqi_communicator.remote.errors import RemoteJobError
from mqi_communicator.remote.upload import upload_file

GPU_REQUESTS = {"gpu": "--gpus=1", "gres": "--gres=gpu:1"}


def case_pseudonym(case_id: str, salt: str) -> str:
    """What names a case on the cluster's queue: ``c`` + 12 hex digits of HMAC-SHA256(salt, case id).

    Stable for a case (a rerun finds its jobs by name), not the case id; with a secret salt
    (``remote_slurm.pseudonym_salt``) it cannot be traced back by hashing candidate ids.
    """
    digest = hmac.new(salt.encode(), case_id.encode(), hashlib.sha256).hexdigest()
    return "c" + digest[:12]


class _JobFile:
    """A job file of a `JobSpec`: ``<workdir>/<beam stem><suffix>``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __get__(self, spec: JobSpec, owner: type | None = None) -> str:
        return spec.path(self.suffix)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A name for job and file names: [A-Za-z0-9._-] only."""
    cleaned = _SAFE.sub("_", text).strip("._")
    if not cleaned:
        raise RemoteJobError(f"cannot make a job/file name from {text!r}")
    return cleaned


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One beam's remote run; every remote path absolute."""

    beam: str
    remote_input: str
    remote_output_dir: str
    remote_workdir: str
    tps_env: str
    moqui_dir: str
    partition: str = "gpu"
    gpu_request: str = "gpu"  # gpu: --gpus=1, gres: --gres=gpu:1
    time_limit_min: int = 60
    job_name: str = ""
    account: str = ""

    def __post_init__(self) -> None:
        if self.gpu_request not in GPU_REQUESTS:
            raise RemoteJobError(f"gpu_request must be one of {sorted(GPU_REQUESTS)}, not {self.gpu_request!r}")
        if self.time_limit_min < 1:
            raise RemoteJobError(f"time limit must be at least 1 minute, not {self.time_limit_min}")
        for name in ("remote_input", "remote_output_dir", "remote_workdir", "moqui_dir"):
            value = getattr(self, name)
            if not value.startswith("/") or any(c in value for c in "\n\r\0"):
                raise RemoteJobError(f"{name} must be an absolute remote path on one line, not {value!r}")
        if posixpath.normpath(self.remote_output_dir) == "/":
            raise RemoteJobError("the remote output dir must not be /")
        if not shlex.split(self.tps_env):
            raise RemoteJobError("tps_env is empty")

    @property
    def stem(self) -> str:
        return safe_name(self.beam)

    @property
    def name(self) -> str:
        return safe_name(self.job_name) if self.job_name else f"mqi_{self.stem}"

    def path(self, suffix: str) -> str:
        return posixpath.join(self.remote_workdir, self.stem + suffix)

    script = _JobFile(".sbatch")  #: the batch script
    slurm_output = _JobFile(".slurm.out")  #: SLURM's --output
    engine_log = _JobFile(".log")  #: the engine's stdout+stderr
    rc_file = _JobFile(".rc")  #: exit code and where it ran (key=value lines)

    def remote_paths(self) -> dict[str, str]:
        return {
            "input": self.remote_input,
            "output_dir": self.remote_output_dir,
            "workdir": self.remote_workdir,
            "script": self.script,
            "slurm_output": self.slurm_output,
            "engine_log": self.engine_log,
            "rc_file": self.rc_file,
            "moqui_dir": self.moqui_dir,
            "tps_env": self.tps_env,
        }


def render_job_script(spec: JobSpec, token: str) -> str:
    """The sbatch script of one beam (see the module doc)."""
    q = shlex.quote
    directives = [
        f"--job-name={spec.name}",
        f"--partition={spec.partition}",
        GPU_REQUESTS[spec.gpu_request],
        f"--time={spec.time_limit_min}",
        f"--output={spec.slurm_output}",
        f"--chdir={spec.remote_workdir}",
        f"--comment={token}",
        "--nodes=1",
        "--ntasks=1",
    ]
    if spec.account:
        directives.append(f"--account={spec.account}")
    for d in directives:
        if any(c.isspace() for c in d) or '"' in d or "'" in d:
            raise RemoteJobError(f"sbatch option {d!r} must not contain spaces or quotes")
    engine = shlex.join(shlex.split(spec.tps_env))
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [
        f"# Beam {spec.beam}: written by mqi_communicator.remote.job (token {token}).",
        "# Runs `cd <moqui_dir> && <tps_env> <beam.in> > <engine log> 2>&1`, then writes the exit",
        "# code (and where it ran) to <beam>.rc beside the log, so the result is judged without sacct.",
        "set -u",
        "umask 077  # the engine's log, raw dose and .rc: readable by this user only",
        f"token={q(token)}",
        f"input={q(spec.remote_input)}",
        f"output_dir={q(spec.remote_output_dir)}",
        f"moqui_dir={q(spec.moqui_dir)}",
        f"engine_log={q(spec.engine_log)}",
        f"rc_file={q(spec.rc_file)}",
        'rm -f -- "$rc_file"',
        "started=$(date +%s.%N)",
        "# a previous attempt's raw must not pass for this run's output",
        'mkdir -p -- "$output_dir" && rm -f -- "$output_dir"/*_Dose.raw',
        "{",
        "    printf '# remote_job: SLURM job %s partition %s node %s CUDA_VISIBLE_DEVICES=%s started %s\\n' \\",
        '        "${SLURM_JOB_ID:-none}" "${SLURM_JOB_PARTITION:-none}" "$(hostname)" "${CUDA_VISIBLE_DEVICES-unset}" "$started"',
        f'    printf \'# cd %s && %s %s\\n\' "$moqui_dir" {q(engine)} "$input"',
        '} >"$engine_log"',
        f'( cd -- "$moqui_dir" && exec {engine} "$input" ) >>"$engine_log" 2>&1',
        "rc=$?",
        "finished=$(date +%s.%N)",
        "{",
        '    printf \'rc=%s\\njob_id=%s\\ntoken=%s\\n\' "$rc" "${SLURM_JOB_ID:-}" "$token"',
        "    printf 'partition=%s\\nnode=%s\\ncuda_visible_devices=%s\\n' \\",
        '        "${SLURM_JOB_PARTITION:-}" "$(hostname)" "${CUDA_VISIBLE_DEVICES-unset}"',
        '    printf \'started=%s\\nfinished=%s\\n\' "$started" "$finished"',
        '} >"$rc_file.tmp.$$" && mv -f -- "$rc_file.tmp.$$" "$rc_file"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def write_job_script(conn: Connection, spec: JobSpec, token: str) -> str:
    """Render the batch script and upload it atomically (``.part``, sha256-verified, rename)."""
    mkdir = run(conn, ["mkdir", "-p", "--", spec.remote_workdir], timeout=60)
    if mkdir.rc != 0:
        raise RemoteJobError(f"cannot create the remote work dir {spec.remote_workdir}: {mkdir.stderr.strip()}")
    with tempfile.TemporaryDirectory(prefix="mqi-sbatch-") as tmp:
        local = Path(tmp) / posixpath.basename(spec.script)
        local.write_text(render_job_script(spec, token))
        upload_file(conn, local, spec.script)
    return spec.script

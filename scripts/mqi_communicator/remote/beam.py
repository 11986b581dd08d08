"""One beam's remote run: submit (or re-attach), poll, judge on the cluster, write the result.

    write_job_script -> record 'submitting' -> sbatch -> record the job id -> poll (squeue)
    -> judge (`outcome.judge_run` on the remote .rc, engine log and OutputDir)
    -> the remote engine log appended to the rule's log -> result JSON for stage-out.

A rerun re-attaches: a recorded job that is still pending/running is polled, a finished one is
judged; a new job is submitted only when there is no record or it says cancelled/failed, or a
record left 'submitting' finds no job carrying its token. ``sbatch`` is never retried blindly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mqi_communicator.files import write_json_atomic
from mqi_communicator.remote.commands import read_remote_text, run
from mqi_communicator.remote.connection import Connection
from mqi_communicator.remote.errors import JobFailed, RemoteJobError, Stopped, TransferError, WaitLimit
from mqi_communicator.remote.hashing import remote_sha256
from mqi_communicator.remote.job_record import RESUBMIT_STATES, load_record, new_record, now_iso, save_record
from mqi_communicator.remote.slurm import (
    DEFAULT_POLL,
    JobRef,
    JobStatus,
    PollOptions,
    cancel,
    check_stop,
    find_job_by_token,
    never,
    poll,
    submit,
)
from mqi_communicator.remote.slurm_script import GPU_REQUESTS, JobSpec, write_job_script
from mqi_communicator.simulate.outcome import FAILURE_MARKERS, judge_run

RESULT_FORMAT = "mqi_communicator.remote_job.result/1"
LOG_TAIL_BYTES = 16 * 1024 * 1024  # at most this much of a remote log is copied into the rule log


class RuleLog:
    """Appends timestamped lines (and remote logs) to the rule's log; echoes lines to stderr."""

    def __init__(self, path: Path | None, echo: TextIO | None = sys.stderr) -> None:
        self.path = path
        self.echo = echo
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"[{now_iso()}] remote_job: {message}"
        if self.echo is not None:
            print(line, file=self.echo, flush=True)
        self._append(line + "\n")

    def block(self, title: str, text: str) -> None:
        body = text if not text or text.endswith("\n") else text + "\n"
        self._append(f"===== {title} =====\n{body}===== end of {title} =====\n")

    def _append(self, text: str) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8", errors="replace") as handle:
            handle.write(text)


def parse_key_values(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


@dataclasses.dataclass(frozen=True)
class Outputs:
    rc: dict[str, str]
    log_text: str | None
    raws: list[tuple[str, int]]  # *_Dose.raw in OutputDir: (name, size)


def judge(
    outputs: Outputs, job_id: str, spec: JobSpec, slurm_state: str, token: str | None = None
) -> tuple[str, int, list[str]]:
    """(raw name, size, success markers) of a successful run; raises `JobFailed` with the reason."""
    failures = [m for m in FAILURE_MARKERS if m in (outputs.log_text or "")]
    if not outputs.rc:
        raise JobFailed(
            f"job {job_id} ended ({slurm_state}) without writing {spec.rc_file}: the engine did not finish "
            "(time limit, cancelled, node failure or an error in the batch script; see the SLURM output)"
            + (f"; log markers {failures}" if failures else "")
        )
    if outputs.rc.get("job_id") != job_id or (token is not None and outputs.rc.get("token") != token):
        raise JobFailed(
            f"{spec.rc_file} was written by job {outputs.rc.get('job_id')!r} (token {outputs.rc.get('token')!r}), "
            f"not by job {job_id}" + (f" (token {token!r})" if token else "")
        )
    try:
        returncode = int(outputs.rc.get("rc", ""))
    except ValueError:
        raise JobFailed(f"{spec.rc_file} holds no exit code: {outputs.rc}") from None
    return judge_run(
        returncode, outputs.log_text, outputs.raws, spec.remote_output_dir, log_name=spec.engine_log, error=JobFailed
    )


def collect_outputs(conn: Connection, spec: JobSpec, timeout: float = 60.0) -> Outputs:
    rc_text = read_remote_text(conn, spec.rc_file, timeout=timeout)
    log_text = read_remote_text(conn, spec.engine_log, timeout=timeout, tail_bytes=LOG_TAIL_BYTES)
    script = (
        'cd -- "$1" 2>/dev/null || exit 0; for f in *_Dose.raw; do [ -f "$f" ] && '
        'printf "%s\\t%s\\n" "$(wc -c <"$f")" "$f"; done; exit 0'
    )
    result = run(conn, ["sh", "-c", script, "sh", spec.remote_output_dir], timeout=timeout)
    if result.rc != 0:
        raise TransferError(f"cannot list {spec.remote_output_dir}: {result.stderr.strip()}")
    raws = []
    for line in result.stdout.splitlines():
        size, _, name = line.partition("\t")
        if name:
            raws.append((name, int(size.strip())))
    return Outputs(parse_key_values(rc_text) if rc_text else {}, log_text, sorted(raws))


def append_remote_logs(conn: Connection, spec: JobSpec, job_id: str, log: RuleLog, outputs: Outputs) -> None:
    where = conn.target.where
    log.block(
        f"engine log of job {job_id}: {where}:{spec.engine_log}",
        outputs.log_text if outputs.log_text is not None else "(missing)\n",
    )
    with contextlib.suppress(TransferError):
        slurm_out = read_remote_text(conn, spec.slurm_output, tail_bytes=LOG_TAIL_BYTES)
        if slurm_out:
            log.block(f"SLURM output of job {job_id}: {where}:{spec.slurm_output}", slurm_out)


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def read_remote_parameters(conn: Connection, spec_input: str) -> dict[str, str]:
    text = read_remote_text(conn, spec_input)
    if text is None:
        raise RemoteJobError(
            f"the remote parameter file {conn.target.where}:{spec_input} does not exist (stage in first)"
        )
    # Imported here: it pulls in the plan reader (pydicom, numpy).
    from mqi_communicator.formats.moqui_parameters import parse_parameters

    try:
        params = parse_parameters(text, f"{conn.target.where}:{spec_input}")
    except ValueError as exc:
        raise RemoteJobError(str(exc)) from exc
    return dict(params.items())


def check_parameters(params: dict[str, str], spec: JobSpec) -> int | None:
    """Fail fast on a parameter file that cannot work in a SLURM job; returns BeamNumbers."""
    lower = {k.lower(): v for k, v in params.items()}
    output_dir = lower.get("outputdir")
    if output_dir is None:
        raise RemoteJobError(f"{spec.remote_input} has no OutputDir")
    if posixpath.normpath(output_dir) != posixpath.normpath(spec.remote_output_dir):
        raise RemoteJobError(
            f"{spec.remote_input}: OutputDir {output_dir} differs from the remote output dir {spec.remote_output_dir}"
        )
    gpu = lower.get("gpuid")
    if gpu is not None and gpu.strip() != "0":
        raise RemoteJobError(
            f"{spec.remote_input}: GPUID {gpu}, but a SLURM job sees its GPU as device 0 (write GPUID 0)"
        )
    try:
        return int(lower["beamnumbers"]) if "beamnumbers" in lower else None
    except ValueError:
        return None


def _submit_new(
    conn: Connection,
    spec: JobSpec,
    record_path: Path,
    previous: dict[str, Any] | None,
    log: RuleLog,
    timeout: float,
) -> dict[str, Any]:
    token = "mqi-" + secrets.token_hex(8)
    record = new_record(spec, conn, token, previous)
    # The script (and the token in it) first; the record says "submitting" BEFORE sbatch runs.
    script = write_job_script(conn, spec, token)
    submitted = time.time()  # (max wait counts from here, also for a job found by its token later)
    record.update(submitted_at=now_iso(submitted), submitted_epoch=submitted)
    save_record(record_path, record)
    try:
        job_id = submit(conn, script, timeout=timeout)
    except (TransferError, JobFailed) as exc:
        # No job id came back: the answer may have been lost, or sbatch may have failed after the
        # controller accepted the job ("Socket timed out"). Never submit blindly a second time.
        log(f"sbatch did not confirm the submission ({exc}); looking the job up by its token {token}")
        time.sleep(1.0)
        found = find_job_by_token(conn, token, timeout=timeout)  # raises: the record stays 'submitting'
        if found is None:
            record.update(state="failed", reason=f"sbatch failed: {exc}")
            save_record(record_path, record)
            raise
        log(f"job {found} was submitted after all")
        job_id = found
    record.update(
        state="submitted",
        job_id=job_id,
        submitted_at=now_iso(submitted),
        submitted_epoch=submitted,
        controller_pid=os.getpid(),
    )
    save_record(record_path, record)
    log(f"submitted job {job_id} ({spec.name}, partition {spec.partition}, {GPU_REQUESTS[spec.gpu_request]})")
    return record


def _resolve_submitting(
    conn: Connection, record: dict[str, Any], record_path: Path, log: RuleLog, timeout: float
) -> dict[str, Any] | None:
    """A record left in ``submitting`` (killed around sbatch): find the job by its token."""
    token = record.get("token") or ""
    found = find_job_by_token(conn, token, timeout=timeout) if token else None
    if found is None:
        rc = read_remote_text(conn, record["remote"]["rc_file"], timeout=timeout)
        values = parse_key_values(rc) if rc else {}
        if token and values.get("token") == token:
            found = values.get("job_id")
    if not found:
        log(f"record {record_path} says 'submitting' but no job carries token {token}: submitting anew")
        return None
    record.update(state="submitted", job_id=found, reason="found by its token after a controller restart")
    save_record(record_path, record)
    log(f"found job {found} of an interrupted submission by its token {token}")
    return record


def run_beam(
    conn: Connection,
    spec: JobSpec,
    *,
    record_path: Path,
    result_path: Path,
    log: RuleLog,
    options: PollOptions = DEFAULT_POLL,
    stop: Callable[[], int | None] = never,
) -> dict[str, Any]:
    """Run (or re-attach to) the beam's job and judge it; returns the result written to ``result_path``.

    Raises `JobFailed`, `Stopped` (job cancelled), `Unreachable`, `RemoteJobError`,
    `TransferError`. The caller holds `record_lock`.
    """
    timeout = options.command_timeout
    record = load_record(record_path)
    if (
        record is not None
        and record.get("remote", {}).get("input") != spec.remote_input
        and record.get("state") not in RESUBMIT_STATES
    ):
        raise RemoteJobError(
            f"record {record_path} holds job {record.get('job_id')} for {record['remote'].get('input')}, "
            f"not {spec.remote_input}; cancel that job or remove the record"
        )
    params = read_remote_parameters(conn, spec.remote_input)
    beam_number = check_parameters(params, spec)

    reattached = False
    if record is not None and record.get("state") == "submitting":
        record = _resolve_submitting(conn, record, record_path, log, timeout)
        reattached = record is not None
    elif record is not None and record.get("job_id") and record.get("state") not in RESUBMIT_STATES:
        reattached = True
        record["controller_pid"] = os.getpid()
        log(f"re-attaching to job {record['job_id']} (record state {record.get('state')})")
    if record is None or not reattached:
        check_stop(stop)  # a stop before anything was submitted: nothing to cancel
        record = _submit_new(conn, spec, record_path, record, log, timeout)
    job_id = str(record["job_id"])
    token = record.get("token")
    job = JobRef(job_id, token, record.get("job_name"))

    def changed(status: JobStatus) -> None:
        reason = f" ({status.reason})" if status.reason and status.reason != "None" else ""
        where = f" on {status.partition}" if status.partition else ""
        log(f"job {job_id}: {status.state}{where}{reason}")
        if status.state != record.get("slurm_state"):
            record["slurm_state"] = status.state
            if status.state == "RUNNING":
                record["state"] = "running"
            save_record(record_path, record)

    submitted_epoch = record.get("submitted_epoch")
    deadline = None
    if options.max_wait is not None:
        deadline = (submitted_epoch or time.time()) + options.max_wait
    try:
        status = poll(conn, job, options=options, deadline=deadline, stop=stop, on_change=changed)
    except Stopped as exc:
        log(f"{exc}: cancelling job {job_id}")
        try:
            final = cancel(conn, job, timeout=timeout)
        except TransferError as err:
            log(f"could not cancel job {job_id} ({err}); it stays recorded: cancel it by hand or rerun")
            raise
        record.update(state="cancelled", slurm_state=final.state, reason=str(exc))
        save_record(record_path, record)
        log(f"job {job_id} cancelled (squeue: {final.state})")
        raise
    except WaitLimit as exc:
        final = cancel(conn, job, timeout=timeout)
        message = (
            f"job {job_id} not finished {options.max_wait:.0f} s after its submission "
            f"(max wait; it was {exc}); cancelled (squeue: {final.state})"
        )
        record.update(state="cancelled", slurm_state=final.state, reason=message)
        save_record(record_path, record)
        with contextlib.suppress(TransferError):
            append_remote_logs(conn, spec, job_id, log, collect_outputs(conn, spec, timeout))
        raise JobFailed(message) from None

    record.update(state="finished", slurm_state=status.state)
    save_record(record_path, record)
    check_stop(stop)  # nothing left to cancel: a rerun judges the finished job
    outputs = collect_outputs(conn, spec, timeout)
    append_remote_logs(conn, spec, job_id, log, outputs)
    try:
        name, size, markers = judge(outputs, job_id, spec, status.state, token)
    except JobFailed as exc:
        record.update(state="failed", reason=str(exc))
        save_record(record_path, record)
        raise
    remote_raw = posixpath.join(spec.remote_output_dir, name)
    sha = remote_sha256(conn, [name], base=spec.remote_output_dir).get(name)
    if sha is None:
        raise JobFailed(f"{remote_raw} vanished before its sha256 was computed")
    started = _as_float(outputs.rc.get("started"))
    finished = _as_float(outputs.rc.get("finished"))
    result: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "beam_name": spec.beam,
        "beam_number": beam_number,
        "job_id": job_id,
        "slurm_state": status.state,
        "slurm_state_source": status.source,
        "exit_code": 0,
        "partition": outputs.rc.get("partition") or status.partition or spec.partition,
        "requested_partition": spec.partition,
        "gpu_request": GPU_REQUESTS[spec.gpu_request],
        "cuda_visible_devices": outputs.rc.get("cuda_visible_devices"),
        "node": outputs.rc.get("node"),
        "host": conn.target.host,
        "user": conn.target.user,
        "remote_input": spec.remote_input,
        "remote_output_dir": spec.remote_output_dir,
        "remote_raw": remote_raw,
        "engine_output": name,
        "bytes": size,
        "sha256": sha,
        "tps_env": spec.tps_env,
        "moqui_dir": spec.moqui_dir,
        "remote_engine_log": spec.engine_log,
        "remote_slurm_output": spec.slurm_output,
        "success_markers": markers,
        "submitted_at": record.get("submitted_at"),
        "started_at": now_iso(started) if started else None,
        "finished_at": now_iso(finished) if finished else None,
        "seconds": round(finished - started, 3) if started and finished else None,
        "queue_seconds": round(started - submitted_epoch, 3) if started and submitted_epoch else None,
        "reattached": reattached,
        "attempts": len(record.get("attempts", [])) + 1,
    }
    write_json_atomic(result_path, result)
    record.update(state="succeeded", reason=None)
    save_record(record_path, record)
    log(f"job {job_id} succeeded: {remote_raw} ({size} bytes, sha256 {sha}) in {result['seconds']} s")
    return result

"""The SLURM client over SSH: ``sbatch``, ``squeue``, ``sacct``, ``scancel``, and waiting for a job.

Polling: ``squeue -h -t all -j <id>`` with backoff (from ``min_interval``, x1.5 per unchanged
answer, up to ``max_interval``). A job that has left squeue has finished; its state then comes
from ``sacct`` where accounting works, else it is ``GONE`` and the files decide. A job id whose
--comment is not ours belongs to another job (ids are reused after a SLURM state reset): it is
never polled as ours nor cancelled. SIGTERM/SIGINT set a flag (`StopFlag`) that the waiting
loops act on within ~0.1 s.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from mqi_communicator.remote.commands import run
from mqi_communicator.remote.connection import Connection
from mqi_communicator.remote.errors import JobFailed, Stopped, TransferError, Unreachable, WaitLimit

#: SLURM states after which a job does no more work (anything else counts as still active).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
GONE = "GONE"  # left squeue, no accounting to ask: the files decide


@dataclasses.dataclass(frozen=True)
class PollOptions:
    min_interval: float = 1.0
    max_interval: float = 300.0
    factor: float = 1.5
    #: seconds from the submission after which the job is cancelled (None: no limit)
    max_wait: float | None = None
    #: seconds without an answer from the cluster before giving up (the job stays recorded)
    unreachable_limit: float = 900.0
    #: timeout of each remote command (squeue, scancel, cat, ...)
    command_timeout: float = 60.0


DEFAULT_POLL = PollOptions()


class StopFlag:
    """SIGTERM/SIGINT set a flag (never raise into paramiko); the waiting loops check it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> int | None:
        return self.signum

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def never() -> int | None:
    return None


def check_stop(stop: Callable[[], int | None]) -> None:
    signum = stop()
    if signum is not None:
        raise Stopped(signum)


def sleep_unless_stopped(seconds: float, stop: Callable[[], int | None]) -> None:
    """Sleep in short slices so a stop signal is acted on within ~0.1 s."""
    end = time.monotonic() + seconds
    while True:
        check_stop(stop)
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def submit(conn: Connection, script: str, *, timeout: float = 60.0) -> str:
    """``sbatch --parsable <script>`` over SSH, never retried blindly; returns the job id.

    Raises `JobFailed` when sbatch refuses the job, `TransferError` when the answer was
    lost (the job may or may not exist: look it up by its token, see `find_job_by_token`).
    """
    result = run(conn, ["sbatch", "--parsable", script], timeout=timeout, idempotent=False)
    if result.rc != 0:
        raise JobFailed(f"sbatch refused {script} (rc {result.rc}): {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().splitlines()[-1].split(";")[0].strip() if result.stdout.strip() else ""
    if not job_id.isdigit():
        raise JobFailed(f"sbatch printed no job id: {result.stdout.strip()!r} {result.stderr.strip()!r}")
    return job_id


def find_job_by_token(conn: Connection, token: str, *, timeout: float = 60.0) -> str | None:
    """The id of this user's job whose --comment is ``token`` (any state squeue still shows)."""
    result = run(conn, ["squeue", "-h", "-t", "all", "-u", conn.target.user, "-o", "%i|%k"], timeout=timeout)
    if result.rc != 0:
        raise TransferError(f"squeue failed: {result.stderr.strip()}", transient=True)
    for line in result.stdout.splitlines():
        job_id, _, comment = line.strip().partition("|")
        if comment.strip() == token:
            return job_id.strip()
    return None


# --------------------------------------------------------------------------------------------
# 3. poll


@dataclasses.dataclass(frozen=True)
class JobRef:
    """A submitted job as this controller knows it: its id, and the --comment token and job name
    that tell it from another job given the same id later (ids are reused after a state reset)."""

    job_id: str
    token: str | None = None
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # SLURM state (PENDING, RUNNING, COMPLETED, ...) or GONE
    active: bool
    partition: str = ""
    reason: str = ""
    source: str = "squeue"  # squeue | sacct | none
    #: the id now belongs to another job (its --comment is not our token): ours is gone
    foreign: bool = False


def query(conn: Connection, job: JobRef, *, timeout: float = 60.0) -> JobStatus:
    """The job's state from squeue (all states); once it has left squeue, from sacct if possible.

    With a ``token``, a job under that id whose --comment differs is not ours (ids are reused, e.g.
    after a controller reset): reported as GONE with ``foreign`` set, never touched. Where the
    site keeps no comments (empty), the job ``name`` must match instead.
    """
    job_id, token, name = job.job_id, job.token, job.name
    result = run(conn, ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%P|%r|%j|%k"], timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.rc == 0 and lines:
        state, partition, reason, job_name, comment = [*lines[0].strip().split("|", 4), "", "", "", ""][:5]
        state = state.strip().upper()
        comment = comment.strip()
        no_comment = comment in ("", "(null)") and name is not None and job_name.strip() == name
        if token is not None and comment != token and not no_comment:
            why = f"job id {job_id} now belongs to another job (comment {comment.strip()!r}, not {token!r})"
            return JobStatus(job_id, GONE, False, partition.strip(), why, foreign=True)
        return JobStatus(job_id, state, state not in TERMINAL_STATES, partition.strip(), reason.strip())
    if result.rc == 0 or "invalid job id" in result.stderr.lower():
        return _query_sacct(conn, job_id, timeout)
    raise TransferError(f"squeue failed (rc {result.rc}): {result.stderr.strip()}", transient=True)


def _query_sacct(conn: Connection, job_id: str, timeout: float) -> JobStatus:
    result = run(conn, ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Partition"], timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.rc == 0 and lines:
        state, _, partition = lines[0].strip().partition("|")
        state = state.split()[0].upper() if state.split() else GONE  # "CANCELLED by 1001"
        return JobStatus(job_id, state, state not in TERMINAL_STATES, partition.strip(), source="sacct")
    return JobStatus(job_id, GONE, False, source="none")


def poll(
    conn: Connection,
    job: JobRef,
    *,
    options: PollOptions = DEFAULT_POLL,
    deadline: float | None = None,
    stop: Callable[[], int | None] = never,
    on_change: Callable[[JobStatus], None] | None = None,
) -> JobStatus:
    """Wait until the job is no longer pending/running; returns its final status.

    Backoff from ``min_interval`` (x ``factor`` per unchanged answer) up to ``max_interval``,
    never past ``deadline`` (epoch seconds: raises `WaitLimit`). A stop signal raises `Stopped`.
    Transient SSH failures are retried until ``unreachable_limit`` (then `Unreachable`).
    ``job``'s token and name recognise a reused job id (see `query`).
    """
    interval = options.min_interval
    last: JobStatus | None = None
    last_contact = time.monotonic()
    while True:
        check_stop(stop)
        try:
            status = query(conn, job, timeout=options.command_timeout)
            last_contact = time.monotonic()
        except TransferError as exc:
            if not exc.transient:
                raise
            if time.monotonic() - last_contact > options.unreachable_limit:
                raise Unreachable(
                    f"no answer from the cluster for {options.unreachable_limit:.0f} s ({exc}); "
                    f"job {job.job_id} stays recorded: rerun to re-attach"
                ) from exc
            if on_change is not None and last is not None:
                on_change(dataclasses.replace(last, reason=f"cluster unreachable: {exc}"))
            status = None
        if status is not None:
            if last is None or (status.state, status.reason) != (last.state, last.reason):
                if on_change is not None:
                    on_change(status)
                if last is not None and status.state != last.state:
                    interval = options.min_interval
            last = status
            if not status.active:
                return status
        if deadline is not None and time.time() >= deadline:
            raise WaitLimit(last.state if last is not None else "unknown")
        wait = interval if deadline is None else max(0.0, min(interval, deadline - time.time()))
        sleep_unless_stopped(wait, stop)
        interval = min(options.max_interval, interval * options.factor)


def cancel(conn: Connection, job: JobRef, *, confirm_s: float = 10.0, timeout: float = 60.0) -> JobStatus:
    """``scancel`` the job and wait (up to ``confirm_s``) until squeue no longer shows it active.

    With a token, a job id that now belongs to another job (see `query`) is left alone.
    """
    status = query(conn, job, timeout=timeout)
    if status.foreign or not status.active:
        return status
    result = run(conn, ["scancel", job.job_id], timeout=timeout)
    if result.rc != 0 and "already" not in result.stderr.lower() and "invalid job id" not in result.stderr.lower():
        raise TransferError(f"scancel {job.job_id} failed: {result.stderr.strip()}")
    end = time.monotonic() + confirm_s
    while True:
        status = query(conn, job, timeout=timeout)
        if not status.active or time.monotonic() >= end:
            return status
        time.sleep(0.2)

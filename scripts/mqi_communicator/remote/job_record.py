"""The local job record of a beam: what makes "exactly one job per beam" survive a killed controller.

Written (atomically, durably) BEFORE ``sbatch`` (state ``submitting``, with the random token that
also goes into the job's ``--comment``) and again right after it with the job id. A lock file
beside it (``<record>.lock``, flock) keeps two controllers off one beam.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mqi_communicator.files import write_json_atomic
from mqi_communicator.remote.connection import Connection
from mqi_communicator.remote.errors import RemoteJobError
from mqi_communicator.remote.slurm_script import JobSpec

RECORD_FORMAT = "mqi_communicator.remote_job.record/1"
#: Record states after which a rerun submits a new job.
RESUBMIT_STATES = frozenset({"cancelled", "failed"})


def now_iso(epoch: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC).isoformat(timespec="milliseconds")


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RemoteJobError(f"job record {path} is unreadable ({exc}); check it, or remove it to submit anew") from exc
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise RemoteJobError(f"{path} is not a remote_job record ({RECORD_FORMAT}); remove it to submit anew")
    return data


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Atomic and durable (`files.write_json_atomic`, fsync'ed): the record is what makes a restart
    safe, so it must be on disk before anything is polled, even across a power cut."""
    record["updated_at"] = now_iso()
    write_json_atomic(path, record, durable=True)


@contextlib.contextmanager
def record_lock(record: Path) -> Iterator[None]:
    """Exclusive flock on ``<record>.lock`` (released by the kernel if this process dies)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    lock_path = record.with_name(record.name + ".lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise RemoteJobError(
                f"another controller (pid {holder}) is attached to this beam ({lock_path} is locked)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_record(spec: JobSpec, conn: Connection, token: str, previous: dict[str, Any] | None) -> dict[str, Any]:
    attempts = list(previous.get("attempts", [])) if previous else []
    if previous and previous.get("job_id"):
        attempts.append(
            {k: previous.get(k) for k in ("job_id", "token", "state", "slurm_state", "reason", "submitted_at")}
        )
    t = conn.target
    return {
        "format": RECORD_FORMAT,
        "beam": spec.beam,
        "state": "submitting",
        "job_id": None,
        "token": token,
        "job_name": spec.name,
        "host": t.host,
        "port": t.port,
        "user": t.user,
        "partition": spec.partition,
        "gpu_request": spec.gpu_request,
        "time_limit_min": spec.time_limit_min,
        "remote": spec.remote_paths(),
        "submitted_at": None,
        "submitted_epoch": None,
        "slurm_state": None,
        "reason": None,
        "controller_pid": os.getpid(),
        "attempts": attempts,
    }

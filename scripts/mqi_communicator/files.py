"""File helpers every step shares: THE atomic write (temp + rename, private mode) and sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: Mode of every file the pipeline writes: patient data, readable by its owner only.
PRIVATE_FILE = 0o600


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to disk; best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, durable: bool = False, mode: int = PRIVATE_FILE
) -> Iterator[IO[bytes]]:
    """A binary handle whose content appears at ``path`` only complete (temp + rename), with ``mode``.

    The temporary file is a unique hidden name beside ``path`` and is removed if the block fails, so
    a killed or failing job never leaves a half file. ``durable``: fsync the file before the rename
    and the folder after it (survives a power cut; for files a restart relies on).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        with open(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` atomically (see `atomic_output`)."""
    with atomic_output(path, durable=durable) as handle:
        handle.write(data)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), durable=durable)


def sha256_of(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_stream_of(stream: IO[Any], path: str | os.PathLike[str]) -> bool:
    """Whether `stream` writes to the file `path` (a workflow rule that sends a step's stderr to
    the step's log: a line the step also appends to the log would then be there twice)."""
    try:
        here, there = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

"""File helpers every step shares: THE atomic write (temp + rename, private mode), sha256, and the
sha256 a step records of the files it wrote (`KnownDigests`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mqi_communicator.errors import InputError

#: Mode of every file the pipeline writes: patient data, readable by its owner only.
PRIVATE_FILE = 0o600
#: In the name of every temporary file: which host wrote it (a temporary of a process that no
#: longer runs is removed only by a writer on the same host: the pid says nothing elsewhere).
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


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
    _remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{_HOST_TAG}.tmp")
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


def _remove_stale_temporaries(target: Path) -> None:
    """Remove the temporary files of ``target`` that a killed writer left (SIGKILL, power cut:
    no cleanup ran): written on this host by a process that no longer runs. The next write of the
    target (the step run again) so leaves no trace of the one that was cut off. A temporary of a
    running process, or of another host (a shared file system), is left alone."""
    prefix = f".{target.name}."
    try:
        with os.scandir(target.parent) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        parts = name[len(prefix) :].split(".")  # pid, random, host tag, "tmp"
        if len(parts) == 4 and parts[2] == _HOST_TAG and parts[0].isdigit() and not _running(int(parts[0])):
            with contextlib.suppress(OSError):
                os.unlink(target.parent / name)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` atomically (see `atomic_output`)."""
    with atomic_output(path, durable=durable) as handle:
        handle.write(data)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), durable=durable)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None where the file is missing or unreadable, or holds no JSON
    object (a state file not written yet, or left half-written by a crash)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def sha256_of(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


StatKey = tuple[int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """A file's identity and version, known without reading it: device, inode, size and mtime (ns).
    A replaced file (new inode) or a rewritten one (size, mtime) gets another key; hard links of
    one file share it. Not the ctime: making a hard link changes it, and the pipeline links P2's
    CSVs into each beam's logFilePath after P2 has recorded them."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KnownDigests:
    """The sha256 of files, recorded by the step that wrote them (it hashes the bytes it has in
    memory) with each file's `stat_key`, so that a step sending them later (stage-in) takes the
    digest from here instead of reading every file once more to hash it: each byte hashed once.
    A file whose key has changed since is not known (and is hashed again by its reader).

    Saved in a JSON object as ``"files": [{"path": REL, "sha256": HEX, "stat_key": [...]}]`` (P2's
    summary holds its files so)."""

    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self.entries: list[dict[str, Any]] = []
        self._by_key: dict[StatKey, str] = {}
        for entry in entries or []:
            self._remember(entry)

    def _remember(self, entry: dict[str, Any]) -> None:
        dev, ino, size, mtime_ns = (int(v) for v in entry["stat_key"])
        self.entries.append(entry)
        self._by_key[(dev, ino, size, mtime_ns)] = entry["sha256"]

    def add(self, path: Path, rel: str, sha256: str) -> None:
        """Record ``path`` (shown as ``rel``), just written, with the sha256 of what was written."""
        self._remember({"path": rel, "sha256": sha256, "stat_key": list(stat_key(os.stat(path)))})

    def get(self, key: StatKey) -> str | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KnownDigests:
        """The ``files`` recorded in the JSON file ``path`` (none if it records none)."""
        try:
            record = json.loads(Path(path).read_text())
            entries = record.get("files", []) if isinstance(record, dict) else None
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str) and len(e.get("stat_key", ())) == 4
                for e in entries
            ):
                raise InputError("'files' is not a list of {path, sha256, stat_key}")
            return cls(entries)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{path}: not a record of file digests: {exc}") from exc


def is_stream_of(stream: IO[Any], path: str | os.PathLike[str]) -> bool:
    """Whether `stream` writes to the file `path` (a workflow rule that sends a step's stderr to
    the step's log: a line the step also appends to the log would then be there twice)."""
    try:
        here, there = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def only_one(lock_file: Path) -> Iterator[bool]:
    """True while this process holds `lock_file`'s exclusive lock; False at once when another
    holds it (that one does the work; the next run finds it free). The lock goes with the process."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True

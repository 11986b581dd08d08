"""sha256 on both sides: on the server many files in one command, started while the upload goes on;
locally in a second thread beside the transfer (`StreamDigests`).

openssl's sha256 uses the CPU's SHA extensions (~1 GB/s); coreutils' sha256sum may not (~150 MB/s
measured with Debian 12's coreutils 9.1); the faster one present is used.
"""

from __future__ import annotations

import collections
import hashlib
import queue
import threading
from collections.abc import Sequence

from .commands import RemoteProcess, sh_command
from .connection import Connection
from .errors import TransferError

_HASH_RATE = 20e6  # bytes/s assumed for remote hashing when sizing its timeout (sha256sum ~150 MB/s)

# openssl's sha256 uses the CPU's SHA extensions (~1 GB/s); coreutils' sha256sum may not (~150 MB/s
# measured with Debian 12's coreutils 9.1). Both print "<hex> *<name>" per file, in order.
_HASH_SCRIPT = r"""
cd -- "$1" || exit 2
if command -v openssl >/dev/null 2>&1 && openssl dgst -sha256 -r /dev/null >/dev/null 2>&1; then
    exec xargs -0 -r openssl dgst -sha256 -r
fi
exec xargs -0 -r sha256sum -b
"""


def check_name(rel: str) -> None:
    """Names the remote hash output can be matched back to unambiguously."""
    if any(c in rel for c in "\n\r\\\0"):
        raise TransferError(f"unsupported character (newline, CR, backslash or NUL) in file name {rel!r}")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TransferError(f"file name {rel!r} is not valid UTF-8") from exc


def start_sha256(conn: Connection, base: str, names: Sequence[str]) -> RemoteProcess:
    for name in names:
        check_name(name)
    listing = b"".join(("./" + n).encode() + b"\0" for n in names)
    return RemoteProcess.start(conn, sh_command(_HASH_SCRIPT, base or "."), listing)


def finish_sha256(job: RemoteProcess, names: Sequence[str], timeout: float) -> dict[str, str]:
    """sha256 of each name that exists remotely (missing names are absent from the result)."""
    rc, out, err = job.wait(timeout)
    if rc == 2:
        raise TransferError(f"remote hashing failed on {job.conn.target.where}: {err.decode(errors='replace').strip()}")
    wanted = set(names)
    sums: dict[str, str] = {}
    for raw in out.decode("utf-8", "surrogateescape").splitlines():
        line = raw.lstrip("\\")
        digest, sep, name = line[:64], line[64:66], line[66:]
        if sep not in (" *", "  ") or len(digest) != 64:
            continue
        name = name.removeprefix("./")
        if name in wanted:
            sums[name] = digest.lower()
    if not sums and names and rc not in (0, 123):
        raise TransferError(
            f"remote hashing failed on {job.conn.target.where} (rc={rc}): {err.decode(errors='replace').strip()}"
        )
    return sums


def remote_sha256(
    conn: Connection, paths: Sequence[str], *, base: str = ".", timeout: float | None = None
) -> dict[str, str]:
    """sha256 computed on the server of files under ``base`` (one command for all); missing ones left out."""

    def once() -> dict[str, str]:
        return finish_sha256(start_sha256(conn, base, paths), paths, timeout or conn.target.op_timeout * 10)

    return conn.call(once, f"sha256 of {len(paths)} file(s) under {base}")


def hash_timeout(conn: Connection, nbytes: int) -> float:
    return conn.target.op_timeout + nbytes / _HASH_RATE


_HASH_BATCH = 8 << 20  # at least this many bytes of finished files per remote hash command
#: ... and at most about this many hash commands per upload: each is a new SSH session and three
#: processes on the server (a 500 MB case in 8 MiB batches: ~60, which cost more CPU than hashing)
_HASH_COMMANDS = 8
_HASH_JOBS = 4  # remote hash commands running at once during an upload


class BackgroundHasher:
    """Hashes uploaded ``.part`` files remotely in batches while the upload goes on.

    At most ``_HASH_JOBS`` hash commands run at once: each is an SSH session, and OpenSSH allows
    10 per connection by default (MaxSessions).
    """

    def __init__(self, conn: Connection, base: str, total_bytes: int = 0) -> None:
        self.conn, self.base, self.max_jobs = conn, base, _HASH_JOBS
        self.batch_bytes = max(_HASH_BATCH, total_bytes // _HASH_COMMANDS)
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.jobs: collections.deque[tuple[RemoteProcess, list[str], int]] = collections.deque()
        self.sums: dict[str, str] = {}

    def add(self, name: str, size: int) -> None:
        """``name`` is complete remotely: hash it with the next batch."""
        self.pending.append(name)
        self.pending_bytes += size
        if self.pending_bytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            while len(self.jobs) >= self.max_jobs:
                self._collect()
            job = start_sha256(self.conn, self.base, self.pending)
            self.jobs.append((job, self.pending, self.pending_bytes))
            self.pending, self.pending_bytes = [], 0

    def _collect(self) -> None:
        job, names, nbytes = self.jobs.popleft()
        self.sums.update(finish_sha256(job, names, hash_timeout(self.conn, nbytes)))

    def results(self) -> dict[str, str]:
        self.flush()
        while self.jobs:
            self._collect()
        return self.sums


class StreamDigests:
    """Local sha256 of what is streamed, computed in a second thread (hashlib releases the GIL)
    while the caller compresses, sends or writes: every byte hashed once, overlapped.
    ``update(data)`` for the bytes of the current file, ``end(key)`` at its end."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | str | None] = queue.Queue(maxsize=32)
        self.digests: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, name="upload-sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        h = hashlib.sha256()
        while (item := self.queue.get()) is not None:
            if isinstance(item, str):  # the end of file ``item``
                self.digests[item] = h.hexdigest()
                h = hashlib.sha256()
            else:
                h.update(item)

    def update(self, data: bytes) -> None:
        self.queue.put(bytes(data) if not isinstance(data, bytes) else data)  # never a reused buffer

    def end(self, rel: str) -> None:
        self.queue.put(rel)

    def finish(self) -> dict[str, str]:
        """{key: sha256} of every file ended so far, in order; the thread ends (call it always)."""
        self.queue.put(None)
        self.thread.join()
        return self.digests

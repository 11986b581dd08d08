"""sha256 on both sides: on the server many files in one command, running while the upload goes on
(`BackgroundHasher`); locally in a second thread beside the transfer (`StreamDigests`).

openssl's sha256 uses the CPU's SHA extensions (~1 GB/s); coreutils' sha256sum may not (~150 MB/s
measured with Debian 12's coreutils 9.1); the faster one present is used.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Sequence

from mqi_communicator.remote.commands import RemoteProcess, sh_command
from mqi_communicator.remote.connection import Connection
from mqi_communicator.remote.errors import TransferError

_HASH_RATE = 20e6  # bytes/s assumed for remote hashing when sizing its timeout (sha256sum ~150 MB/s)

# openssl's sha256 uses the CPU's SHA extensions (~1 GB/s); coreutils' sha256sum may not (~150 MB/s
# measured with Debian 12's coreutils 9.1). Both print "<hex> *<name>" per file, in order.
# $2: names per hash process at most.
_HASH_SCRIPT = r"""
cd -- "$1" || exit 2
if command -v openssl >/dev/null 2>&1 && openssl dgst -sha256 -r /dev/null >/dev/null 2>&1; then
    exec xargs -0 -r -n "$2" openssl dgst -sha256 -r
fi
exec xargs -0 -r -n "$2" sha256sum -b
"""
# The same for names arriving one a line while an upload goes on: each empty line ends a batch,
# which is hashed at once (the caller sizes the batches); exit status 123 when a batch failed, as
# xargs's.
_BATCH_HASH_SCRIPT = r"""
cd -- "$1" || exit 2
if command -v openssl >/dev/null 2>&1 && openssl dgst -sha256 -r /dev/null >/dev/null 2>&1; then
    hash() { openssl dgst -sha256 -r "$@"; }
else
    hash() { sha256sum -b "$@"; }
fi
rc=0
set --
while IFS= read -r name; do
    if [ -n "$name" ]; then set -- "$@" "$name"; continue; fi
    [ $# -eq 0 ] || hash "$@" || rc=123
    set --
done
[ $# -eq 0 ] || hash "$@" || rc=123
exit $rc
"""
_ALL_AT_ONCE = 4096  # names per hash process when all names are known up front (xargs also splits by length)


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
    return RemoteProcess.start(conn, sh_command(_HASH_SCRIPT, base or ".", str(_ALL_AT_ONCE)), _listing(names))


def _listing(names: Sequence[str]) -> bytes:
    return b"".join(("./" + n).encode() + b"\0" for n in names)


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


#: hash processes per upload, about (each is a process start on the server): batches of
#: total/_HASH_RUNS bytes, smaller towards the end (at least `_MIN_BATCH`)
_HASH_RUNS = 8
_MIN_BATCH = 2 << 20
_MAX_NAMES = 500  # per batch (the command line's length)


class BackgroundHasher:
    """Hashes uploaded ``.part`` files on the server while the upload goes on, in ONE remote
    command (one SSH session, whatever the number of files): each name is written to its stdin
    once the file is complete there, and it hashes them in batches as they come. Batches shrink
    towards the end of the upload (at most half of what is still to come), so that little is left
    to hash once the stream is over."""

    def __init__(self, conn: Connection, base: str, total_bytes: int) -> None:
        self.conn, self.base = conn, base
        self.batch = max(_MIN_BATCH, total_bytes // _HASH_RUNS)
        self.left = total_bytes  # bytes not yet added
        self.job: RemoteProcess | None = None
        self.names: list[str] = []
        self.nbytes = 0
        self.pending: tuple[int, int] = (0, 0)  # names, bytes in the batch being filled

    def add(self, name: str, size: int) -> None:
        """``name`` is complete remotely: hash it (with the batch being filled)."""
        check_name(name)
        if self.job is None:
            self.job = RemoteProcess.start(self.conn, sh_command(_BATCH_HASH_SCRIPT, self.base or "."), keep_stdin=True)
        self.names.append(name)
        self.nbytes += size
        self.left -= size
        count, nbytes = self.pending[0] + 1, self.pending[1] + size
        line = ("./" + name + "\n").encode()
        if nbytes >= max(_MIN_BATCH, min(self.batch, self.left // 2)) or count >= _MAX_NAMES:
            line += b"\n"  # the batch is complete: hash it now
            count = nbytes = 0
        self.pending = (count, nbytes)
        self.job.chan.sendall(line)

    def results(self) -> dict[str, str]:
        """{name: sha256} of every name added (absent: missing remotely)."""
        if self.job is None:
            return {}
        self.job.chan.shutdown_write()
        return finish_sha256(self.job, self.names, hash_timeout(self.conn, self.nbytes))


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

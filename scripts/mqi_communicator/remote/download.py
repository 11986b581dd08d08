"""Download one file from the cluster: atomic (``.part`` + rename), sha256-verified, resumable.

The bytes come as one ``zstd`` stream over an exec channel when the server has zstd (a dose
volume, mostly zeros, is ~6x smaller), decompressed, written and hashed in a second thread;
otherwise by SFTP with a 16 MiB window and prefetched reads at the server's largest read size.
The remote sha256 is the caller's (computed beforehand by the job that wrote the file) or is
computed remotely while the download runs. The local file is 0600.
"""

from __future__ import annotations

import logging
import os
import posixpath
import queue
import stat
import threading
from typing import IO, Any, cast

import zstandard

from mqi_communicator.files import PRIVATE_FILE, fsync_dir, sha256_of
from mqi_communicator.remote import fastpath
from mqi_communicator.remote.commands import RemoteProcess, exec_private, home_relative, sh_command, use_zstd
from mqi_communicator.remote.connection import MAX_PACKET, PART_SUFFIX, READ_REQ, WINDOW, Connection
from mqi_communicator.remote.errors import TransferError, VerifyError
from mqi_communicator.remote.hashing import StreamDigests, finish_sha256, hash_timeout, start_sha256

log = logging.getLogger(__name__)

#: Downloads are compressed by the server's zstd CLI with this option: a dose volume (mostly
#: zeros) at ~1.5 GB/s, about as small as level 1.
_ZSTD_DOWNLOAD_OPTION = "--fast=3"


class _HashedOutput:
    """The ``.part`` file being written and the sha256 of what is written to it."""

    def __init__(self, out: Any, digest: Any, limit: int, what: str) -> None:
        self.out, self.digest, self.limit, self.what = out, digest, limit, what
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:  # e.g. the file grew: never write past the size stat'ed
            raise TransferError(f"{self.what} sent more than its size: it changed during the download", transient=True)
        self.out.write(data)
        self.digest.update(data)
        return len(data)


class _Sink:
    """Decompresses (zstd streams) and writes the downloaded data in a second thread, hashed in a
    third (`StreamDigests`).

    All three release the GIL, so they run beside paramiko's Python work on the SSH packets
    (measured +7 % download speed for plain SFTP). A bounded queue keeps memory flat when the disk
    is slower; zstd's output comes in 1 MiB pieces, however well the data compresses.
    """

    def __init__(self, out: Any, digest: Any, *, limit: int, what: str, zstd: bool = False) -> None:
        self.output = _HashedOutput(out, digest, limit, what)
        self.writer: Any = (
            zstandard.ZstdDecompressor().stream_writer(cast(IO[bytes], self.output), write_size=1 << 20, closefd=False)
            if zstd
            else self.output
        )
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="download-sink", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(data)
                except BaseException as exc:  # e.g. disk full: reported to the reader, who stops
                    self.error = exc

    def put(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def finish(self) -> int:
        """Wait until everything queued is written; returns the bytes written to the file."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.output.written


def _fetch_sftp(conn: Connection, remote: str, size: int, offset: int, sink: _Sink) -> None:
    """Bytes ``offset``.. of ``remote`` into ``sink`` with prefetched SFTP reads."""
    # not closed on failure: close() waits for an answer (op_timeout again on a stalled
    # server); the handle goes with the dropped connection
    f = conn.sftp.open(remote, "rb")
    f.seek(offset)
    n = offset
    req = READ_REQ
    if size - n > req:
        req, data = fastpath.read_request_size(f, req)
        if data:
            sink.put(data)
            n += len(data)
            f.seek(n)  # the single read does not advance the file position
    fastpath.set_request_size(f, req)
    if n < size:
        f.prefetch(size)  # pipelined reads from the current position to the end
    while n < size:
        data = f.read(req)
        if not data:
            break
        sink.put(data)
        n += len(data)
    f.close()


# The file comes on zstd's stdin (zstd refuses a symlink named as its input) or, when resuming,
# from tail; a failure shows as zstd's status or as missing bytes, which the size and sha256
# checks catch.
_ZSTD_CAT_SCRIPT = f"""
[ -f "$1" ] && [ -r "$1" ] || {{ echo "cannot read $1" >&2; exit 2; }}
if [ "$2" -gt 0 ]; then
    tail -c +"$(($2 + 1))" -- "$1" | zstd -q -c {_ZSTD_DOWNLOAD_OPTION}
else
    exec zstd -q -c {_ZSTD_DOWNLOAD_OPTION} <"$1"
fi
"""


def _fetch_zstd(conn: Connection, remote: str, offset: int, sink: _Sink) -> None:
    """Bytes ``offset``.. of ``remote`` into ``sink`` as one zstd stream over an exec channel.

    No SFTP request/answer per 255 KiB and, for a dose volume, ~6x fewer bytes to encrypt and
    decrypt; the sink decompresses.
    """
    t = conn.target
    chan = conn.transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=t.channel_timeout)
    fastpath.install_message_pipe(chan)
    chan.settimeout(t.op_timeout)  # a stalled server: recv() raises after op_timeout of silence
    command = sh_command(_ZSTD_CAT_SCRIPT, remote, str(offset))
    try:
        exec_private(chan, command)
        chan.shutdown_write()
        while data := chan.recv(1 << 20):
            sink.put(data)
    except BaseException:
        chan.close()
        raise
    rc, _, err = RemoteProcess(conn, chan, command).wait(t.op_timeout)
    if rc != 0:
        raise TransferError(
            f"zstd stream of {t.where}:{remote} failed (rc={rc}): {err.decode(errors='replace').strip()}",
            transient=rc == -1,
        )


def _download_once(conn: Connection, remote: str, local: str, expected: str | None, fsync: bool) -> str:
    sftp = conn.sftp
    st = sftp.stat(remote)
    if st.st_mode is not None and not stat.S_ISREG(st.st_mode):
        raise TransferError(f"{conn.target.where}:{remote} is not a regular file")
    size = st.st_size or 0
    parent, name = posixpath.split(remote)
    # The sha256 to meet: the caller's (computed remotely beforehand, e.g. by the job that wrote
    # the file), else computed remotely now, while the download runs.
    memo: list[str] = [expected.lower()] if expected else []
    job = None if expected else start_sha256(conn, parent or ".", [name])

    def remote_digest() -> str:
        if not memo:
            assert job is not None
            got = finish_sha256(job, [name], hash_timeout(conn, size)).get(name)
            if got is None:
                raise TransferError(f"{conn.target.where}:{remote} vanished during the download")
            memo.append(got)
        return memo[0]

    if os.path.isfile(local) and os.path.getsize(local) == size:  # already here?
        have = sha256_of(local)
        if have == remote_digest():
            return have

    part = local + PART_SUFFIX
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    if offset > size:
        offset = 0
    digests = StreamDigests()
    zstd = size - offset > 0 and use_zstd(conn)
    # the .part is private from its first byte (patient data), whatever the umask
    fd = os.open(part, os.O_RDWR | os.O_CREAT | (0 if offset else os.O_TRUNC), PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    try:
        with open(fd, "r+b") as out:
            if offset:
                out.truncate(offset)
                while chunk := out.read(4 << 20):
                    digests.update(chunk)
                log.info("resuming %s at %d of %d bytes", remote, offset, size)
            sink = _Sink(out, digests, limit=size - offset, what=f"{conn.target.where}:{remote}", zstd=zstd)
            try:
                if zstd:
                    _fetch_zstd(conn, remote, offset, sink)
                else:
                    _fetch_sftp(conn, remote, size, offset, sink)
            finally:
                n = offset + sink.finish()  # everything received is in the .part file (a retry resumes after it)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
    finally:
        digests.end(name)
        digest = digests.finish()[name]
    if n != size:
        raise TransferError(f"{conn.target.where}:{remote}: got {n} of {size} bytes", transient=True)
    want = remote_digest()
    if digest != want:
        os.unlink(part)
        raise VerifyError(
            f"download {conn.target.where}:{remote}: local sha256 {digest} != {'expected' if expected else 'remote'} {want}"
            + (" (resumed .part discarded; retrying from the start)" if offset else ""),
            transient=bool(offset),  # a stale .part: a fresh attempt can succeed
        )
    os.replace(part, local)
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(local)))
    return digest


def download_file(
    conn: Connection,
    remote_path: str,
    local_path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    fsync: bool = False,
) -> str:
    """Download one file atomically and verified; returns its sha256.

    Written to ``<local>.part`` (continued if one is there), then compared with the sha256 of the
    remote file, then renamed. That sha256 is ``expected_sha256`` when given (computed remotely
    beforehand, e.g. by the job that wrote the file: saves hashing it again there), otherwise it
    is computed remotely (openssl or sha256sum) while the download runs. An identical local file
    is not downloaded again. The bytes come as a zstd stream when the connection's
    ``compression`` allows it and the server has zstd, else by SFTP reads. ``fsync``: flush file
    and folder to disk before returning.
    """
    local = os.fspath(local_path)
    remote = home_relative(remote_path)
    os.makedirs(os.path.dirname(os.path.abspath(local)), mode=0o700, exist_ok=True)
    return conn.call(
        lambda: _download_once(conn, remote, local, expected_sha256, fsync), f"download {remote} -> {local}"
    )

"""Every use of paramiko's private API, in one place, and only for the paramiko versions it was tested with.

These make transfers faster; none is needed for correctness. Each helper checks `enabled()`
(paramiko's version is one of `TESTED_PARAMIKO`, the pin of envs/requirements.txt) and otherwise
takes paramiko's public API: its own receive buffer, the default SFTP request size, one rename
per file. A paramiko upgrade therefore cannot make a transfer hang through a changed internal;
it only runs at public-API speed until the new version is tested and added here.

- `MessagePipe` replaces a channel's ``in_buffer`` (a `BufferedPipe` subclass relying on its
  ``_lock``, ``_cv``, ``_event`` and ``_closed``).
- `set_request_size` / `read_request_size` set ``SFTPFile.MAX_REQUEST_SIZE`` and probe with
  ``SFTPFile._read``.
- `wait_exit_status` waits on ``Channel.status_event``.
- `send_window` reads ``Channel.out_window_size`` (how far the server has consumed a stream).
- `rename_all` pipelines renames with ``SFTPClient._async_request`` / ``_read_response`` /
  ``_convert_status``.
"""

from __future__ import annotations

import time
from typing import Any

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import CMD_EXTENDED, CMD_STATUS

from mqi_communicator.remote.errors import TransferError, describe

#: paramiko versions the private-API paths below were tested with (tests/test_transfer.py runs
#: every transfer both ways). Add a version only after running those tests with it.
TESTED_PARAMIKO: frozenset[str] = frozenset({"5.1.0"})
#: paramiko's own SFTP request size (SFTPFile.MAX_REQUEST_SIZE), used by the public-API path.
PUBLIC_REQUEST_SIZE = 32768
_WINDOW_QUARTER = 4 * 1024 * 1024  # never wait for more than a quarter of the 16 MiB window


def enabled() -> bool:
    """Whether the installed paramiko is one the private-API paths were tested with."""
    return paramiko.__version__ in TESTED_PARAMIKO


class MessagePipe(BufferedPipe):
    """Receive buffer for the SFTP channel (replaces paramiko's BufferedPipe there).

    paramiko's buffer keeps data in an array.array consumed with ``del buf[:n]`` (an O(buffered
    bytes) move per read: with a 16 MiB window every 4-byte SFTP header read moved megabytes), and
    wakes the reader for every SSH packet, so each 255 KiB SFTP message arrived in several pieces
    that paramiko concatenates. Here the buffer is a bytearray (O(1) consumption), and ``read(n)``
    waits until n bytes are there (the SFTP client always reads whole headers and messages), the
    reader being woken only then. Timeouts keep their meaning: PipeTimeout after ``timeout``
    seconds without any new data; what has arrived by then is returned.
    """

    def __init__(self) -> None:
        super().__init__()
        self._data = bytearray()
        self._want = 1

    def set_event(self, event: Any) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._data:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._data += data
            if self._event is not None:
                self._event.set()
            if len(self._data) >= self._want:
                self._cv.notify_all()

    def read_ready(self) -> bool:
        with self._lock:
            return bool(self._data)

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._lock:
            want = max(1, min(nbytes, _WINDOW_QUARTER))  # never wait for more than the window lets in
            if len(self._data) < want and not self._closed:
                if timeout == 0.0:
                    if not self._data:
                        raise PipeTimeout()
                else:
                    seen = len(self._data)
                    while len(self._data) < want and not self._closed:
                        self._want = want
                        woke = self._cv.wait(timeout)
                        self._want = 1
                        if not woke and len(self._data) == seen:  # a whole timeout of silence
                            if self._data:
                                break
                            raise PipeTimeout()
                        seen = len(self._data)
            n = min(nbytes, len(self._data))
            with memoryview(self._data) as view:
                out = bytes(view[:n])
            del self._data[:n]
            if not self._data and self._event is not None and not self._closed:
                self._event.clear()
            return out

    def empty(self) -> bytes:
        with self._lock:
            out = bytes(self._data)
            self._data.clear()
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cv.notify_all()
            if self._event is not None:
                self._event.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def install_message_pipe(chan: paramiko.Channel) -> None:
    """Give a freshly opened channel the O(1) `MessagePipe` (before any data can arrive on it)."""
    if enabled():
        chan.in_buffer = MessagePipe()


def set_request_size(f: paramiko.SFTPFile, size: int) -> None:
    """Read/write requests of ``size`` bytes on ``f`` (paramiko's default: 32 KiB)."""
    if enabled():
        f.MAX_REQUEST_SIZE = size


def send_window(chan: paramiko.Channel) -> int | None:
    """Bytes ``chan`` may still send before the server's next window adjustment (``Channel.out_window_size``);
    None on the public-API path. The server adjusts the window as it consumes what was sent."""
    return int(chan.out_window_size) if enabled() else None


def wait_exit_status(chan: paramiko.Channel, seconds: float) -> None:
    """Wait up to ``seconds`` for the channel's exit status, woken by it (``Channel.status_event``);
    the public-API path polls `exit_status_ready` every 10 ms."""
    if enabled():
        chan.status_event.wait(seconds)
        return
    end = time.monotonic() + seconds
    while not chan.exit_status_ready() and time.monotonic() < end:
        time.sleep(0.01)


def read_request_size(f: paramiko.SFTPFile, first: int) -> tuple[int, bytes]:
    """Probe the server's read size with exactly one READ; returns (size to use, data read).

    BufferedFile.read() would loop until it has ``first`` bytes and hide a short answer, which
    would later make paramiko's prefetch fall back to slow synchronous reads. Public-API path:
    paramiko's default size, nothing read.
    """
    if not enabled():
        return PUBLIC_REQUEST_SIZE, b""
    f.MAX_REQUEST_SIZE = first
    data = f._read(first)
    return (len(data) if 0 < len(data) < first else first), data


class _Answers:
    """Collects the answers to pipelined SFTP requests (paramiko's async-response hook)."""

    def __init__(self) -> None:
        self.got: dict[int, tuple[int, Any]] = {}

    def _async_response(self, t: int, msg: Any, num: int) -> None:
        self.got[num] = (t, msg)


def rename_all(sftp: paramiko.SFTPClient, pairs: list[tuple[str, str]]) -> None:
    """posix-rename@openssh.com each (old, new): all requests sent at once, one round trip in all
    instead of one per file. Public-API path: one `posix_rename` (one round trip) per file."""
    if not enabled():
        for old, new in pairs:
            try:
                sftp.posix_rename(old, new)
            except OSError as exc:
                raise TransferError(f"rename {old} -> {new} failed: {describe(exc)}") from exc
        return
    answers = _Answers()
    nums = [sftp._async_request(answers, CMD_EXTENDED, "posix-rename@openssh.com", old, new) for old, new in pairs]
    while len(answers.got) < len(nums):
        sftp._read_response()
    for num, (old, new) in zip(nums, pairs, strict=True):
        t, msg = answers.got[num]
        try:
            if t != CMD_STATUS:
                raise OSError(f"unexpected SFTP answer type {t}")
            sftp._convert_status(msg)
        except (OSError, EOFError) as exc:
            raise TransferError(f"rename {old} -> {new} failed: {describe(exc)}") from exc

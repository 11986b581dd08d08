"""Commands on the cluster's login node over an SSH exec channel, with a timeout each.

Every command runs under ``umask 077`` (`PRIVATE_UMASK`): whatever it creates there (staged
case files, folders, job scripts, and through ``sbatch`` the job's own outputs) is readable by
the SSH user only. Also: remote paths (``~``, relative = from the login home), and which optional
tools (tar, zstd) the server has.
"""

from __future__ import annotations

import logging
import os
import posixpath
import select
import shlex
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import paramiko

from mqi_communicator.errors import InputError
from mqi_communicator.remote import fastpath
from mqi_communicator.remote.connection import COMPRESSION, Connection
from mqi_communicator.remote.errors import CommandTimeout, TransferError

log = logging.getLogger(__name__)

#: Prefixed to every remote command: files 0600, folders 0700 (POSIX sh, bash, csh and fish all
#: accept it).
PRIVATE_UMASK = "umask 077; "


class CommandResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


def sh_command(script: str, *args: str) -> str:
    """A command line running a POSIX sh script with arguments, whatever the login shell is."""
    return " ".join(["sh", "-c", shlex.quote(script), "sh", *(shlex.quote(a) for a in args)])


def exec_private(chan: paramiko.Channel, command: str) -> None:
    """Start ``command`` on ``chan`` under `PRIVATE_UMASK` (every remote command goes through here)."""
    chan.exec_command(PRIVATE_UMASK + command)


class RemoteProcess:
    """A remote command running on ``chan``; `wait()` collects its exit status and output."""

    def __init__(self, conn: Connection, chan: paramiko.Channel, command: str) -> None:
        self.conn, self.chan, self.command = conn, chan, command

    @classmethod
    def start(
        cls, conn: Connection, command: str, stdin: bytes | None = None, *, keep_stdin: bool = False
    ) -> RemoteProcess:
        """Start ``command``; ``stdin`` is sent, then stdin is closed (unless ``keep_stdin``: the
        caller writes more to ``chan`` and calls ``chan.shutdown_write()``)."""
        chan = conn.transport.open_session(timeout=conn.target.channel_timeout)
        chan.settimeout(conn.target.op_timeout)
        exec_private(chan, command)
        if stdin:
            chan.sendall(stdin)
        if not keep_stdin:
            chan.shutdown_write()
        return cls(conn, chan, command)

    def wait(self, timeout: float) -> tuple[int, bytes, bytes]:
        chan = self.chan
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        fd = chan.fileno()  # readable while stdout or stderr data (or close) is pending
        try:
            while True:
                while chan.recv_ready():
                    out += chan.recv(1 << 20)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 20)
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    if not chan.recv_ready() and not chan.recv_stderr_ready():
                        break
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    self.conn.abandon()  # the transport may be stuck (paramiko #822): use a fresh one
                    raise CommandTimeout(
                        f"remote command on {self.conn.target.where} did not finish within {timeout:.0f} s "
                        f"(it may still be running there): {short(self.command)}"
                    )
                if chan.eof_received:  # no more output; only the exit status is awaited
                    fastpath.wait_exit_status(chan, min(left, 1.0))
                else:
                    select.select([fd], [], [], min(left, 1.0))
            rc = chan.recv_exit_status()
            if rc == -1 and not chan.transport.is_active():
                raise TransferError(
                    f"connection to {self.conn.target.where} lost while running: {short(self.command)}",
                    transient=True,
                )
        finally:
            self._close()
        return rc, bytes(out), bytes(err)

    def _close(self) -> None:
        # paramiko #822: a rekey coinciding with the channel close can deadlock the transport for
        # 30 s. The result is already in hand; close in the background and abandon the connection
        # if that does not finish promptly.
        closer = threading.Thread(target=self.chan.close, name="ssh-chan-close", daemon=True)
        closer.start()
        closer.join(2.0)
        if closer.is_alive():
            log.warning("exec channel close on %s stuck (paramiko #822?): reconnecting", self.conn.target.where)
            self.conn.abandon()


def short(command: str, limit: int = 200) -> str:
    return command if len(command) <= limit else command[:limit] + "..."


def execute(conn: Connection, command: str, timeout: float, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    return RemoteProcess.start(conn, command, stdin).wait(timeout)


def run(
    conn: Connection,
    command: str | Sequence[str],
    timeout: float,
    *,
    stdin: bytes | str | None = None,
    idempotent: bool = True,
) -> CommandResult:
    """Run a command remotely: ``(rc, stdout, stderr)`` (rc -1: killed by a signal).

    A sequence is shell-quoted argument by argument; a string goes to the login shell as is. A
    transient failure (connection lost, or no exit status within ``timeout``, which is also how
    paramiko's exec-channel deadlock #822 shows) is retried on a fresh connection, unless
    ``idempotent=False`` (e.g. sbatch): then `TransferError`/`CommandTimeout` is raised at once,
    because the command may or may not have run.
    """
    line = command if isinstance(command, str) else shlex.join(command)
    data = stdin.encode() if isinstance(stdin, str) else stdin

    def once() -> CommandResult:
        rc, out, err = execute(conn, line, timeout, data)
        return CommandResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    return conn.call(once, f"run {short(line, 80)!r}", idempotent=idempotent)


def home_relative(path: str | os.PathLike[str]) -> str:
    """SFTP and the exec shell both start in the login home; "~/x" means "x" there."""
    p = os.fspath(path)
    if p == "~":
        return "."
    p = p.removeprefix("~/")
    return posixpath.normpath(p) if p else "."


_TOOLS_SCRIPT = "for t in tar zstd; do command -v $t >/dev/null 2>&1 && echo $t; done; exit 0"


def ask_tools(conn: Connection) -> RemoteProcess | None:
    """Start asking which optional tools the server has, without waiting for the answer (the
    caller does something else meanwhile, then passes the result to `remote_tools`); None when
    known already."""
    return None if conn.tools is not None else RemoteProcess.start(conn, sh_command(_TOOLS_SCRIPT))


def remote_tools(conn: Connection, asked: RemoteProcess | None = None) -> frozenset[str]:
    """Which of the optional remote tools (tar, zstd) the server has; asked once per connection
    (``asked``: the question already started by `ask_tools`)."""
    if conn.tools is None:
        job = asked or RemoteProcess.start(conn, sh_command(_TOOLS_SCRIPT))
        rc, out, _ = job.wait(conn.target.op_timeout)
        conn.tools = frozenset(out.decode(errors="replace").split()) if rc == 0 else frozenset()
    return conn.tools


def zstd_wanted(compression: str, remote_tools: frozenset[str], where: str) -> bool:
    """Whether data streams go zstd-compressed: ``compression`` (see `COMPRESSION`) given the
    server's tools. "zstd" without zstd on the server is an error naming the host."""
    if compression not in COMPRESSION:
        raise InputError(f"compression must be one of {COMPRESSION}, not {compression!r}")
    if compression == "none":
        return False
    if "zstd" in remote_tools:
        return True
    if compression == "zstd":
        raise TransferError(
            f"compression is zstd but {where} has no zstd command (install zstd there, or set "
            f"hpc_connection.compression to auto or none)"
        )
    return False


def use_zstd(conn: Connection) -> bool:
    if conn.target.compression == "none":  # no need to ask the server
        return False
    return zstd_wanted(conn.target.compression, remote_tools(conn), conn.target.where)


def remote_home(conn: Connection, timeout: float = 60.0) -> str:
    """The remote login folder (absolute)."""
    result = run(conn, "pwd", timeout=timeout)
    home = result.stdout.strip()
    if result.rc != 0 or not home.startswith("/"):
        raise TransferError(f"cannot determine the remote home folder: {result.stderr.strip()}")
    return home


def absolute(path: str, home: str) -> str:
    """A remote path made absolute: ``~``, ``~/x`` and relative paths are taken from ``home``."""
    if path == "~" or path.startswith("~/"):
        path = path[2:]
    return posixpath.normpath(posixpath.join(home, path))


def absolute_command(command: str, home: str) -> str:
    """``~/bin/tps_env args`` -> ``/home/u/bin/tps_env args`` (only the program word)."""
    words = shlex.split(command)
    if words and (words[0] == "~" or words[0].startswith("~/")):
        words[0] = absolute(words[0], home)
    return shlex.join(words)


def read_remote_text(
    conn: Connection, path: str, *, timeout: float = 60.0, tail_bytes: int | None = None
) -> str | None:
    """A remote text file (its last ``tail_bytes`` if given); None when it does not exist."""
    command = ["cat", "--", path] if tail_bytes is None else ["tail", "-c", str(tail_bytes), "--", path]
    result = run(conn, command, timeout=timeout)
    if result.rc != 0:
        probe = run(conn, ["test", "-e", path], timeout=timeout)
        if probe.rc != 0:
            return None
        raise TransferError(f"cannot read {conn.target.where}:{path}: {result.stderr.strip()}")
    return result.stdout

"""How a rule's shell command starts a step: `python -S -P step_client.py -m MODULE ARGS...`.

With a step server of this run (MQI_STEP_SERVER names its socket; ops/step_server.py), the step
runs in a child forked from that server, which has the package and its heavy libraries imported
already: this process passes its arguments, working folder, environment, umask and its stdin,
stdout and stderr (the job's log; SCM_RIGHTS) to the server, forwards the signals it gets, and
exits with the step's exit status (128 + N when signal N ended it, as a shell reports it).
Without a server, or in a SLURM job (the step belongs to that job's allocation, not to the login
node where the server runs), or when the server cannot be reached, it becomes
`python -m MODULE ARGS...` itself (exec): the same contract (docs/end-to-end-speed.md).

Run by path with `python -S -P` (no site-packages, no script folder on sys.path: ~15 ms to
start), so it imports only the standard library and nothing of the package; `python_command`
gives that command line to those who start steps.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import struct
import sys

SOCKET_VARIABLE = "MQI_STEP_SERVER"  # "off": no server (every step a `python -m` of its own)
STARTED = b"S"  # the server's word that the step runs (its exit status follows)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def python_command(module: str) -> list[str]:
    """The command that starts `python -m MODULE` through this client (arguments follow)."""
    return [sys.executable, "-S", "-P", os.path.abspath(__file__), "-m", module]


def run_python(module: str, args: list[str]) -> None:
    """Become `python -m MODULE ARGS...` (never returns)."""
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def connect() -> socket.socket | None:
    path = os.environ.get(SOCKET_VARIABLE)
    if not path or os.environ.get("SLURM_JOB_ID"):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    return conn


def request(module: str, args: list[str]) -> bytes:
    umask = os.umask(0)
    os.umask(umask)
    payload = json.dumps(
        {"module": module, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
    ).encode("utf-8", "surrogateescape")
    return struct.pack("!I", len(payload)) + payload


def run_in_server(conn: socket.socket, module: str, args: list[str]) -> int | None:
    """The step's exit status; None when the server went away before it started the step."""
    data = request(module, args)
    try:
        # The three standard streams travel with the first bytes; the server reads the rest.
        sent = conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        conn.sendall(data[sent:])
        if conn.recv(1) != STARTED:
            return None
    except OSError:
        return None

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            conn.send(bytes([signum]))

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    reply = b""
    while len(reply) < 4:
        chunk = conn.recv(4 - len(reply))
        if not chunk:
            sys.stderr.write("mqi step client: the step server closed the connection without a status\n")
            return 1
        reply += chunk
    return int(struct.unpack("!i", reply)[0])


USAGE = "usage: python -m mqi_communicator.step_client -m MODULE [ARGS...]\n"


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE + "\n" + (__doc__ or ""))
        return 0
    if len(argv) < 2 or argv[0] != "-m":
        sys.stderr.write(USAGE)
        return 2
    module, args = argv[1], argv[2:]
    conn = connect()
    if conn is None:
        run_python(module, args)
    assert conn is not None
    try:
        code = run_in_server(conn, module, args)
    finally:
        conn.close()
    if code is None:
        run_python(module, args)
    return code or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

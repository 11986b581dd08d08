"""The step server of one Snakemake run: the steps' Python start-up paid once per run, not per job.

A run of the embedded default spends most of its time starting Python processes and importing
numpy, scipy, pydicom, matplotlib and the package, not computing (docs/end-to-end-speed.md). The
Snakefile (rules/common.smk) starts this server when the run has work; it imports those once,
then for every step a rule starts through ops/step_client.py:

- a handler process is forked per connection; it receives the step (module, arguments, working
  folder, environment, umask) and the client's stdin, stdout and stderr (SCM_RIGHTS);
- the handler forks the worker, which takes those streams as its 0, 1, 2, that folder, that
  environment and umask, and runs the module as `python -m MODULE` would (`__main__`, sys.argv);
- the handler sends the worker's exit status back (128 + N when signal N ended it), forwards the
  signals the client forwards, and ends the worker when the client goes away (killed job).

So each step stays its own process (a crash fails only its job; its log, outputs and exit status
are its own), only the start-up is shared. The server ends when the Snakemake process that
started it does (the read end of a pipe whose write end only Snakemake holds reaches EOF), and
serves only its own user (SO_PEERCRED), through a socket in a folder only that user can enter.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import io
import json
import os
import random
import resource
import runpy
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

from mqi_communicator.step_client import SOCKET_VARIABLE, STARTED, python_command

PROG = "python -m mqi_communicator.ops.step_server"
TIMES_VARIABLE = "MQI_STEP_TIMES"
# What the steps of a case import (each about 0.3-1.5 s), in the order the steps come: loaded one
# by one between requests, so the first step need not wait for what only the last one needs.
PRELOAD = (
    "numpy",
    "pydicom",
    "mqi_communicator.intake.__main__",
    "mqi_communicator.qa.fraction_records",
    "mqi_communicator.interpret",
    "mqi_communicator.moqui_input",
    "mqi_communicator.simulate.__main__",
    "mqi_communicator.simulate.engine",
    "mqi_communicator.rtdose.__main__",
    "matplotlib.pyplot",
    "mqi_communicator.report",
    "mqi_communicator.qa.run",
    "mqi_communicator.qa.report_pdf",
    "mqi_communicator.qa.trend",
)
# Snakemake options under which no job runs: no server then.
NOTHING_RUNS = {"-n", "--dry-run", "--dryrun", "--lint", "--unlock", "--report", "--touch", "-t"}
NOTHING_RUNS_PREFIXES = (
    "--report=",
    "--dag",
    "--rulegraph",
    "--filegraph",
    "--list",
    "--summary",
    "--detailed-summary",
)


def client_python() -> str:
    """The `python` a rule's shell command starts a step with: `python -S -P step_client.py`
    (followed by `-m MODULE ARGS`), with or without a server (mqi_communicator/step_client.py)."""
    return shlex.join(python_command("")[:-2])


def wanted(argv: list[str]) -> bool:
    """A server for this Snakemake process: jobs will run here (not a dry run, lint, report...),
    this is not a SLURM job, and no server of an enclosing run serves it already."""
    if os.environ.get("SLURM_JOB_ID") or os.environ.get(SOCKET_VARIABLE):
        return False
    return not any(arg in NOTHING_RUNS or arg.startswith(NOTHING_RUNS_PREFIXES) for arg in argv)


class Started:
    """A server started by this process: `path` its socket; it ends when this process does, or
    at close()."""

    def __init__(self, path: str, lifeline: int, process: subprocess.Popen[bytes]) -> None:
        self.path, self.lifeline, self.process = path, lifeline, process

    def close(self) -> None:
        os.close(self.lifeline)
        self.process.wait()


FOLDER_PREFIX = "mqi-steps-"
# A folder this young may belong to a server that is starting (made, socket not bound yet).
STALE_AFTER_S = 60.0


def remove_stale_folders(parent: str | None = None) -> int:
    """Remove this user's server folders that a run killed outright (SIGKILL, power cut) left
    behind: their socket is bound by no process any more (/proc/net/unix). Returns how many."""
    try:
        with open("/proc/net/unix") as table:
            bound = {
                fields[-1] for fields in (line.split() for line in table.read().splitlines()[1:]) if len(fields) > 7
            }
    except OSError:
        return 0  # not Linux, or /proc hidden: leave everything
    removed = 0
    with contextlib.suppress(OSError), os.scandir(parent or tempfile.gettempdir()) as entries:
        for entry in entries:
            if not entry.name.startswith(FOLDER_PREFIX):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            young = time.time() - info.st_mtime < STALE_AFTER_S
            if info.st_uid != os.getuid() or young or os.path.join(entry.path, "socket") in bound:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def start() -> Started:
    """Start a server for this process and set MQI_STEP_SERVER for the jobs it starts (after
    removing what servers of killed runs left in the temporary folder)."""
    remove_stale_folders()
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)  # mode 0700
    path = os.path.join(folder, "socket")
    lifeline_read, lifeline_write = os.pipe()  # neither end is inherited by the jobs
    # Listening before the server has started: a step that comes early waits in the backlog.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "mqi_communicator.ops.step_server", "--socket", path),
            *("--listen-fd", str(listener.fileno()), "--lifeline", str(lifeline_read)),
        ],
        pass_fds=(lifeline_read, listener.fileno()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C reaches Snakemake and the jobs; the server follows Snakemake
    )
    os.close(lifeline_read)
    listener.close()
    os.environ[SOCKET_VARIABLE] = path
    return Started(path, lifeline_write, process)


def preloads() -> Iterator[None]:
    """Load the libraries and modules of PRELOAD, then warm the drawing code: one piece a step."""
    import matplotlib

    matplotlib.use("Agg")  # headless, as every step that draws selects it
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
        yield
    with contextlib.suppress(Exception):
        _warm_drawing()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = os.environ.get(TIMES_VARIABLE)
    if times:
        with open(times, "a") as f:
            f.write(json.dumps({"module": "(step server start-up)", "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")


def _warm_drawing() -> None:
    """Draw a little text into a PNG and a PDF with embedded TrueType fonts, as the dose maps
    and the QA report do: matplotlib's font caches and the font subsetter's modules are then
    loaded once here instead of in every step that draws (~1 s of the QA step)."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    for family, weight in (("sans-serif", "normal"), ("sans-serif", "bold"), ("monospace", "normal")):
        figure.text(0.1, 0.5, "QA 0.0 Gy", family=family, weight=weight)
    figure.savefig(io.BytesIO(), format="png")
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans"}), PdfPages(io.BytesIO()) as pdf:
        pdf.savefig(figure)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    header = b""
    while len(header) < 4:
        data, ancillary, _flags, _addr = conn.recvmsg(4 - len(header), socket.CMSG_LEN(3 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if not data:
            raise ConnectionError("client closed before its request")
        header += data
    size = struct.unpack("!I", header)[0]
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("client closed mid-request")
        body += chunk
    if len(fds) != 3:
        raise ConnectionError(f"expected the client's 3 standard streams, got {len(fds)} descriptors")
    return json.loads(body.decode("utf-8", "surrogateescape")), fds


def run_step(step: dict[str, Any], fds: list[int]) -> int:
    """In the worker: become the step's process and run its module as `python -m` does."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    os.chdir(step["cwd"])
    os.environ.clear()
    os.environ.update(step["env"])
    os.umask(step["umask"])
    # Each worker its own random state (fork copies the server's).
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    sys.argv = [step["module"], *step["argv"]]
    # The module is loaded already (preload): runpy's warning about it says nothing here.
    warnings.filterwarnings(
        "ignore", message=".* found in sys.modules after import of package", category=RuntimeWarning
    )
    code = 0
    try:
        runpy.run_module(step["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _exit_code(value: object) -> int:
    """sys.exit's argument as the exit status `python` gives it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def handle(conn: socket.socket) -> None:
    """In the handler: run one step in a worker and report its exit status to the client."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    step, fds = receive(conn)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        conn.close()
        os.setpgid(0, 0)  # its own process group: what it starts goes with it (see _wait)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = 1
        try:
            code = run_step(step, fds)
        finally:
            os._exit(code)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: the group exists before _wait may need to kill it
    for fd in fds:
        os.close(fd)
    # The step runs: from here on the client reports its outcome (before this, it would run the
    # step itself had the server gone away).
    with contextlib.suppress(OSError):
        conn.sendall(STARTED)
    status = _wait(conn, pid, step, started)
    with contextlib.suppress(OSError):
        conn.sendall(struct.pack("!i", status))


def _wait(conn: socket.socket, pid: int, step: dict[str, Any], started: float) -> int:
    """The worker's exit status as a shell reports it. Signals the client forwards go to the
    worker; a client that dies (SIGKILL: its job killed, a power-cut test) takes the worker's
    process group with it at once, as that signal would have taken a `python -m` step."""
    pidfd = os.pidfd_open(pid)
    watched = [pidfd, conn.fileno()]
    while True:
        readable, _, _ = select.select(watched, [], [])
        if pidfd in readable:
            _pid, status, usage = os.wait4(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            _record(step, {"wall_s": time.monotonic() - started, "cpu_s": usage.ru_utime + usage.ru_stime, "rc": code})
            return code
        data = conn.recv(16)
        for signum in data:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not data:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            watched = [pidfd]


def _record(step: dict[str, Any], figures: dict[str, Any]) -> None:
    """One line per step (module, arguments, wall and CPU seconds, exit status) to the file that
    MQI_STEP_TIMES in the step's environment names, if any (benchmarks/end_to_end.py)."""
    path = step["env"].get(TIMES_VARIABLE)
    if path:
        line = json.dumps({"module": step["module"], "argv": step["argv"], **figures})
        with open(os.path.join(step["cwd"], path), "a") as f:
            f.write(line + "\n")


def serve(path: str, listen_fd: int, lifeline: int) -> int:
    listener = socket.socket(fileno=listen_fd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through `finally`: the socket goes
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    uid = os.getuid()
    loading: Iterator[None] | None = preloads()
    try:
        while True:
            readable, _, _ = select.select([listener.fileno(), lifeline], [], [], 0 if loading else None)
            if lifeline in readable:
                return 0  # Snakemake has ended
            if not readable and loading:
                if next(loading, StopIteration) is StopIteration:
                    loading = None
                continue
            conn, _ = listener.accept()
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != uid:
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                os.close(lifeline)
                code = 0
                try:
                    handle(conn)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            conn.close()
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the Unix socket's path (its folder is removed at the end)")
    parser.add_argument("--listen-fd", type=int, required=True, help="that socket, bound and listening")
    parser.add_argument("--lifeline", type=int, required=True, help="a pipe's read end: EOF ends the server")
    args = parser.parse_args(argv)
    return serve(args.socket, args.listen_fd, args.lifeline)


if __name__ == "__main__":
    sys.exit(main())

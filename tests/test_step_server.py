"""The step server and its client (ops/step_server.py, step_client.py): a step started through
the client behaves like `python -m MODULE` whether a server runs it or not: exit status, streams,
working folder, environment, umask; a crash or a kill ends only that step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqi_communicator import step_client
from mqi_communicator.ops import step_server

pytestmark = pytest.mark.unit

CLIENT = step_client.python_command("")[:-2]

PROBE = textwrap.dedent(
    """
    import os, signal, sys, time

    def main(argv):
        what = argv[0]
        if what == "exit":
            return int(argv[1])
        if what == "raise":
            raise RuntimeError("the probe failed on purpose")
        if what == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if what == "echo":
            umask = os.umask(0)
            print(os.getcwd(), os.environ.get("PROBE_VALUE"), oct(umask), sys.stdin.read().strip(), sys.argv[1:])
            print("to stderr", file=sys.stderr)
            return 0
        if what == "sleep":
            signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(143)))
            with open(argv[1], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
            return 0
        return 2

    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def probe_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module `stepprobe` importable by the client's fallback and by a server started after."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "stepprobe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return folder


@pytest.fixture
def server(probe_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[step_server.Started]:
    monkeypatch.delenv(step_client.SOCKET_VARIABLE, raising=False)
    started = step_server.start()
    yield started
    started.close()
    monkeypatch.delenv(step_client.SOCKET_VARIABLE, raising=False)


def step(*args: str, cwd: Path, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLIENT, "-m", "stepprobe", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def served(times: Path) -> list[str]:
    return times.read_text().splitlines() if times.exists() else []


def test_a_step_behaves_the_same_with_and_without_the_server(tmp_path: Path, server: step_server.Started) -> None:
    work = tmp_path / "work"
    work.mkdir()
    times = tmp_path / "times.jsonl"
    env = {"PROBE_VALUE": "from the job", step_server.TIMES_VARIABLE: str(times)}
    results = {}
    for name, extra in (("server", {}), ("off", {step_client.SOCKET_VARIABLE: "off"})):
        results[name] = step("echo", "--beam=A B", cwd=work, stdin="from stdin\n", env={**env, **extra})
    assert [r.returncode for r in results.values()] == [0, 0]
    assert results["server"].stdout == results["off"].stdout
    assert results["server"].stdout.startswith(f"{work} from the job 0o22 from stdin ['echo', '--beam=A B']")
    assert results["server"].stderr == results["off"].stderr == "to stderr\n"
    # The first ran in the server (it wrote its line), the second as `python -m` (none).
    lines = served(times)
    assert len([line for line in lines if '"rc": 0' in line]) == 1


@pytest.mark.parametrize(
    ("args", "code", "stderr"),
    [
        (["exit", "3"], 3, ""),
        (["raise"], 1, "RuntimeError: the probe failed on purpose"),
        (["segv"], 128 + signal.SIGSEGV, ""),
    ],
)
def test_exit_status_and_errors_pass_through_and_the_server_goes_on(
    tmp_path: Path, server: step_server.Started, args: list[str], code: int, stderr: str
) -> None:
    failed = step(*args, cwd=tmp_path)
    off = step(*args, cwd=tmp_path, env={step_client.SOCKET_VARIABLE: "off"})
    # A shell reports a signal's death as 128 + N; the client does, as it cannot die of it itself.
    assert failed.returncode == code
    assert off.returncode in (code, -signal.SIGSEGV)
    assert stderr in failed.stderr and stderr in off.stderr
    # Only that step failed: the server runs the next one.
    assert step("exit", "0", cwd=tmp_path).returncode == 0


def test_real_cli_usage_error_is_the_same(tmp_path: Path, server: step_server.Started) -> None:
    with_server = subprocess.run(
        [*CLIENT, "-m", "mqi_communicator.formats.plan"], cwd=tmp_path, capture_output=True, text=True
    )
    without = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.formats.plan"], cwd=tmp_path, capture_output=True, text=True
    )
    assert with_server.returncode == without.returncode == 2
    assert with_server.stderr == without.stderr
    assert "usage:" in with_server.stderr


def wait_for_file(path: Path) -> str:
    deadline = time.monotonic() + 60
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_killed_client_takes_its_step_with_it(tmp_path: Path, server: step_server.Started) -> None:
    pid_file = tmp_path / "pid"
    client = subprocess.Popen([*CLIENT, "-m", "stepprobe", "sleep", str(pid_file)], cwd=tmp_path)
    worker = int(wait_for_file(pid_file))
    assert worker != client.pid and alive(worker)
    client.kill()  # SIGKILL: as a job killed with its process group
    client.wait()
    deadline = time.monotonic() + 10
    while alive(worker):
        assert time.monotonic() < deadline, "the step outlived its killed job"
        time.sleep(0.05)


def test_signals_to_the_client_reach_the_step(tmp_path: Path, server: step_server.Started) -> None:
    pid_file = tmp_path / "pid"
    log = tmp_path / "step.log"
    with log.open("w") as out:
        client = subprocess.Popen(
            [*CLIENT, "-m", "stepprobe", "sleep", str(pid_file)], cwd=tmp_path, stdout=out, stderr=out
        )
        wait_for_file(pid_file)
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 143
    assert log.read_text() == "got SIGTERM\n"


def test_no_server_in_a_slurm_job_nor_for_a_dry_run(tmp_path: Path, server: step_server.Started) -> None:
    times = tmp_path / "times.jsonl"
    done = step("exit", "0", cwd=tmp_path, env={"SLURM_JOB_ID": "42", step_server.TIMES_VARIABLE: str(times)})
    assert done.returncode == 0
    assert not [line for line in served(times) if '"rc"' in line]
    assert not step_server.wanted(["snakemake", "--dry-run"])
    assert not step_server.wanted(["snakemake"])  # the fixture's server is in this environment


def test_the_server_ends_with_its_starter(probe_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(step_client.SOCKET_VARIABLE, raising=False)
    started = step_server.start()
    socket_folder = Path(started.path).parent
    started.close()
    assert started.process.returncode == 0
    assert not socket_folder.exists()


def test_a_server_that_died_leaves_the_steps_to_python(tmp_path: Path, server: step_server.Started) -> None:
    server.process.kill()
    server.process.wait()
    times = tmp_path / "times.jsonl"
    done = step("exit", "4", cwd=tmp_path, env={step_server.TIMES_VARIABLE: str(times)})
    assert done.returncode == 4
    assert not served(times)


def test_folders_of_killed_servers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """A run killed outright leaves its server's folder; the next server removes it, never one
    whose socket a process still holds, nor one just made (a server still starting)."""
    import socket

    def server_folder(name: str, age_s: float) -> tuple[Path, socket.socket]:
        folder = tmp_path / f"{step_server.FOLDER_PREFIX}{name}"
        folder.mkdir()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(folder / "socket"))
        listener.listen(1)
        old = time.time() - age_s
        os.utime(folder, (old, old))
        return folder, listener

    killed, dead = server_folder("killed", 3600)
    dead.close()  # the socket file stays, bound by nobody: what SIGKILL leaves
    live, listening = server_folder("live", 3600)
    starting, young = server_folder("starting", 1)
    young.close()
    other = tmp_path / "unrelated"
    other.mkdir()
    try:
        assert step_server.remove_stale_folders(str(tmp_path)) == 1
        assert not killed.exists()
        assert live.is_dir() and starting.is_dir() and other.is_dir()
    finally:
        listening.close()

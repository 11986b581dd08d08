"""The simulate step's contract with tps_env: exit code, output file, log markers, timeout, GPUs."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_communicator.simulate.runner import SimulationError, check_success, exclusive_gpu


def _fake_engine(tmp_path: Path, body: str) -> str:
    """A stand-in tps_env (shell script) for contract paths the built-in engine never takes."""
    script = tmp_path / "tps_env"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def _parameter_file(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    path = tmp_path / "moqui_tps_B1.in"
    path.write_text(
        f"GPUID 0\nBeamNumbers 1\nGantryNum 2\nDicomDir {tmp_path}\nlogFilePath {tmp_path}\nOutputDir {out}\nOutputFormat raw\n"
    )
    return path


def _simulate(tmp_path: Path, tps_env: str, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mqi_communicator.simulate", "--input", str(_parameter_file(tmp_path))]
    command += ["--tps-env", tps_env, "--moqui-dir", str(tmp_path), "--log", str(tmp_path / "engine.log")]
    command += ["--output-raw", str(tmp_path / "B1_Dose.raw"), "--record", str(tmp_path / "B1.json")]
    command += ["--gpu-lock-dir", str(tmp_path / "locks"), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_success_moves_raw_and_records(tmp_path: Path) -> None:
    # $1 is the run copy of the parameter file; the fake engine writes where OutputDir says.
    engine = _fake_engine(
        tmp_path,
        'out=$(sed -n "s/^OutputDir //p" "$1"); gpu=$(sed -n "s/^GPUID //p" "$1")\n'
        'printf "x%.0s" $(seq 64) > "$out/B1:x_2_Dose.raw"; echo "GPU $gpu"; echo "Total execution time: 1"\n',
    )
    result = _simulate(tmp_path, engine, "--gpu-devices", "3")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "B1.json").read_text())
    assert record["engine_output"] == "B1:x_2_Dose.raw" and record["bytes"] == 64 and record["gpu"] == 3
    assert record["beam_number"] == 1
    assert (tmp_path / "B1_Dose.raw").stat().st_size == 64
    log = (tmp_path / "engine.log").read_text()
    assert "GPU 3" in log and "Total execution time" in log  # the device held was written for the engine


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("echo 'ERROR: no beam'; exit 2\n", "engine exited with 2"),
        (
            'out=$(sed -n "s/^OutputDir //p" "$1"); echo x > "$out/a_2_Dose.raw"; echo "FATAL ERROR: cuda"\n',
            "failure marker",
        ),
        ("echo 'Total execution time: 1'\n", "found none"),
        ('out=$(sed -n "s/^OutputDir //p" "$1"); : > "$out/a_2_Dose.raw"\n', "is empty"),
        (
            'out=$(sed -n "s/^OutputDir //p" "$1"); echo x > "$out/a_2_Dose.raw"; echo x > "$out/b_2_Dose.raw"\n',
            "found",
        ),
    ],
)
def test_failures_are_named(tmp_path: Path, body: str, reason: str) -> None:
    result = _simulate(tmp_path, _fake_engine(tmp_path, body))
    assert result.returncode == 1
    assert reason in result.stderr
    assert reason in (tmp_path / "engine.log").read_text()  # the rule's log says why too
    assert not (tmp_path / "B1_Dose.raw").exists() and not (tmp_path / "B1.json").exists()


def test_failure_said_once_when_the_workflow_sends_stderr_to_the_log(tmp_path: Path) -> None:
    # rules/simulate.smk: `... >> {log} 2>&1`, so that the step's lines stay off the console.
    engine = _fake_engine(tmp_path, "echo FATAL ERROR: no beam; exit 3\n")
    command = [sys.executable, "-m", "mqi_communicator.simulate", "--input", str(_parameter_file(tmp_path))]
    command += ["--tps-env", engine, "--moqui-dir", str(tmp_path), "--log", str(tmp_path / "engine.log")]
    command += ["--output-raw", str(tmp_path / "B1_Dose.raw"), "--record", str(tmp_path / "B1.json")]
    command += ["--gpu-lock-dir", str(tmp_path / "locks")]
    with open(tmp_path / "engine.log", "a") as log:
        assert subprocess.run(command, stdout=log, stderr=log, timeout=60, check=False).returncode == 1
    text = (tmp_path / "engine.log").read_text()
    assert "FATAL ERROR: no beam" in text and text.count("SIMULATION FAILED for moqui_tps_B1.in") == 1, text


def test_hung_engine_is_killed_at_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "engine.pid"
    engine = _fake_engine(tmp_path, f"echo $$ > {pid_file}\nsleep 300 &\necho $! >> {pid_file}\nwait\n")
    started = time.monotonic()
    result = _simulate(tmp_path, engine, "--timeout", "2")
    assert result.returncode == 1 and "timeout" in result.stderr
    assert time.monotonic() - started < 30
    for pid in map(int, pid_file.read_text().split()):
        assert not _alive(pid)  # the engine and what it started are gone


def _alive(pid: int) -> bool:
    """Running (a zombie left for a PID 1 that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _hold_gpu(devices: list[int], lock_dir: str, hold: float, results: multiprocessing.Queue) -> None:
    with exclusive_gpu(devices, Path(lock_dir), wait_seconds=60) as device:
        start = time.monotonic()
        time.sleep(hold)
        results.put((device, start, time.monotonic()))


def test_gpu_locks_are_exclusive(tmp_path: Path) -> None:
    """Five beams, two GPUs: never two beams on one device at the same time."""
    os.environ.pop("SLURM_JOB_ID", None)
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_hold_gpu, args=([0, 1], str(tmp_path), 0.6, results)) for _ in range(5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    spans = [results.get(timeout=5) for _ in workers]
    assert {device for device, _, _ in spans} == {0, 1}
    for device in (0, 1):
        mine = sorted((s, e) for d, s, e in spans if d == device)
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(mine))


def test_check_success_reads_markers(tmp_path: Path) -> None:
    (tmp_path / "beam_2_Dose.raw").write_bytes(b"1" * 8)
    (tmp_path / "log").write_text("Simlulation finalizing..\nTime taken by MC engine: 2\n")
    raw, markers = check_success(0, tmp_path, tmp_path / "log")
    assert raw.name == "beam_2_Dose.raw" and "Simlulation finalizing.." in markers
    (tmp_path / "log").write_text("Segmentation fault (core dumped)\n")
    with pytest.raises(SimulationError, match="Segmentation fault"):
        check_success(0, tmp_path, tmp_path / "log")

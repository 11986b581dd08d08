"""Run one beam's MOQUI (or the built-in engine) exactly as the real thing is run:

    cd <moqui_dir> && <tps_env> <beam.in> > <log> 2>&1

Success (docs/design.md#moqui-engine-contract, `outcome`) = exit 0, exactly one non-empty `*_Dose.raw` in the beam's OutputDir, and
no failure marker in the log. A run that neither ends nor fails is killed at the timeout. On a
workstation each concurrently running beam holds an exclusive GPU (a lock file per device);
the device is written into the run copy of the parameter file (GPUID). Under SLURM the job's
allotted GPU is device 0 (SLURM sets CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from mqi_communicator import cli, settings, step_client
from mqi_communicator.errors import TRANSIENT
from mqi_communicator.files import sha256_of, write_json_atomic
from mqi_communicator.formats.moqui_parameters import parse_parameter_file, render_parameter_file
from mqi_communicator.simulate.outcome import RAW_PATTERN, SimulationError, judge_run

BUILTIN = "builtin"


def engine_command(tps_env: str) -> list[str]:
    """`builtin` is this package's engine run by the current Python (no PATH needed under cron)."""
    if tps_env == BUILTIN:
        # Through the step client: forked from this run's step server when there is one.
        return step_client.python_command("mqi_communicator.simulate.engine")
    return shlex.split(tps_env)


@contextlib.contextmanager
def exclusive_gpu(devices: Sequence[int], lock_dir: Path, wait_seconds: float) -> Iterator[int]:
    """Hold an exclusive lock on one device of `devices` for the duration of the block.

    flock locks vanish with the process that holds them, so a killed run never leaves a
    device locked; any number of Snakemake processes on the host share the same lock folder."""
    if os.environ.get("SLURM_JOB_ID"):
        # SLURM has already given this job its own GPU, visible as device 0.
        yield 0
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        for device in devices:
            handle = open(lock_dir / f"gpu{device}.lock", "a")  # noqa: SIM115 - held until the block ends
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                yield device
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() > deadline:
            raise SimulationError(
                f"no free GPU among {list(devices)} after {wait_seconds:.0f} s (locks in {lock_dir})", kind=TRANSIENT
            )
        time.sleep(0.5)


def _terminate(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop the engine and everything it started (it runs in its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_engine(command: list[str], parameter_file: Path, moqui_dir: Path, log: TextIO, timeout: float) -> int:
    """Run the engine in moqui_dir with stdout+stderr to log; kill it at timeout or when this
    process is asked to stop (Snakemake cancelling the job), so no engine is left behind."""
    process = subprocess.Popen(
        [*command, str(parameter_file)], cwd=moqui_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )

    def stop(signum: int, _frame: object) -> None:
        _terminate(process)
        raise SimulationError(f"stopped by signal {signal.Signals(signum).name}; engine terminated", kind=TRANSIENT)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        _terminate(process)
        raise SimulationError(
            f"engine still running after the {timeout:.0f} s timeout; killed", kind=TRANSIENT
        ) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_success(returncode: int, output_dir: Path, log_path: Path) -> tuple[Path, list[str]]:
    """The single raw dose file of a successful run, and the success markers seen (`outcome.judge_run`)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    raws = [(p.name, p.stat().st_size) for p in sorted(output_dir.glob(RAW_PATTERN))]
    name, _, markers = judge_run(returncode, text, raws, str(output_dir))
    return output_dir / name, markers


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    params = parse_parameter_file(args.input)
    output_dir = Path(params["OutputDir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("*_Dose.raw"):
        stale.unlink()  # a previous, failed attempt must not pass for this run's output
    started = time.time()
    with exclusive_gpu(args.gpu_devices, args.gpu_lock_dir, args.gpu_wait) as device:
        run_file = args.input.with_name(args.input.stem + ".run.in")
        run_file.write_text(render_parameter_file(params, {"GPUID": device}, header=f"run copy of {args.input.name}"))
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "w") as log:
            log.write(
                f"# {shlex.join(engine_command(args.tps_env))} {run_file}  (cwd {args.moqui_dir}, GPU {device})\n"
            )
            log.flush()
            returncode = run_engine(engine_command(args.tps_env), run_file.resolve(), args.moqui_dir, log, args.timeout)
    raw, markers = check_success(returncode, output_dir, args.log)
    args.output_raw.parent.mkdir(parents=True, exist_ok=True)
    os.replace(raw, args.output_raw)
    return {
        "beam_number": int(params["BeamNumbers"]),
        "beam_name": args.beam_name or args.input.stem.removeprefix("moqui_tps_"),
        "parameter_file": str(args.input),
        "engine": args.tps_env,
        "engine_output": raw.name,
        "raw": str(args.output_raw),
        "bytes": args.output_raw.stat().st_size,
        "sha256": sha256_of(args.output_raw),
        "gpu": device,
        # Evidence of where the run happened, read from the job's own environment.
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_partition": os.environ.get("SLURM_JOB_PARTITION"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "host": os.uname().nodename,
        "seconds": round(time.time() - started, 3),
        "success_markers": markers,
    }


def _operational_defaults(args: argparse.Namespace, simulation: dict[str, Any]) -> None:
    """The options not given, from the configuration's simulation section."""
    if args.timeout is None:
        args.timeout = float(simulation["timeout_seconds"])
    if args.gpu_devices is None:
        args.gpu_devices = [int(d) for d in simulation["gpu_devices"]]
    if args.gpu_lock_dir is None:
        args.gpu_lock_dir = Path(simulation["gpu_lock_dir"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.simulate",
        description="Run one beam's MOQUI tps_env (or the built-in engine) and check it.",
    )
    parser.add_argument("--input", type=Path, required=True, help="the beam's MOQUI parameter file")
    parser.add_argument("--beam-name", help="beam named in the run record (default: from the file name)")
    parser.add_argument("--tps-env", default=BUILTIN, help="tps_env command, or 'builtin' for the built-in engine")
    parser.add_argument("--moqui-dir", type=Path, default=Path.cwd(), help="folder the engine runs in")
    parser.add_argument("--log", type=Path, required=True, help="engine log (stdout and stderr)")
    parser.add_argument("--output-raw", type=Path, required=True, help="where the beam's raw dose is moved")
    parser.add_argument("--record", type=Path, required=True, help="JSON record of the run")
    # Operational settings (docs/development.md#configuration): under the workflow they come with
    # the configuration (MQI_RUNTIME_SETTINGS), never as options, so they travel one way only.
    parser.add_argument("--timeout", type=float, help="seconds before a running engine is killed")
    parser.add_argument("--gpu-devices", type=lambda s: [int(d) for d in s.split(",")], help="e.g. 0,1")
    parser.add_argument("--gpu-lock-dir", type=Path, help="folder of the GPU lock files")
    parser.add_argument(
        "--gpu-wait", type=float, default=24 * 3600.0, help="seconds to wait for a free GPU (%(default)s)"
    )
    settings.add_argument(parser)
    parser.epilog = "--timeout, --gpu-devices, --gpu-lock-dir: default simulation.* of the configuration"
    # The workflow appends stderr to the engine's log; run by hand, the log gets the lines too.
    return cli.run(
        parser,
        _simulate,
        argv,
        step="simulate",
        label="SIMULATION",
        subject=lambda a: a.input.name,
        log_of=lambda a: a.log,
    )


def _simulate(args: argparse.Namespace) -> int:
    if None in (args.timeout, args.gpu_devices, args.gpu_lock_dir):
        _operational_defaults(args, settings.load(args.settings)["simulation"])
    record = simulate(args)
    write_json_atomic(args.record, record)
    print(f"{args.input.name}: {record['engine_output']} on GPU {record['gpu']} in {record['seconds']} s")
    return 0

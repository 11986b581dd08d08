"""CLI: the remote GPU step for one beam, a SLURM job submitted over SSH from outside the cluster.

The work is done by `beam.run_beam` (submit or re-attach, poll, judge, result), with
`slurm_script`, `slurm`, `job_record`; this module turns options and the config into a
`JobSpec` and exit codes. Two ways to say what to run (explicit options override ``--settings``)::

    python -m mqi_communicator.remote.job \\
        --host H --port P --user U --key KEY --known-hosts KNOWN_HOSTS \\
        --remote-input /abs/moqui_tps_B1.in [--remote-output-dir DIR] --remote-workdir DIR \\
        --tps-env CMD --moqui-dir DIR [--beam NAME] [--job-name NAME] \\
        [--partition gpu] [--gpu-request gpu|gres] [--time-limit MIN] [--account A] \\
        --record REC.json --result RESULT.json --log RULE.log \\
        [--poll-min S] [--poll-max S] [--max-wait S] [--unreachable-limit S]

    # as rules/remote.smk calls it: everything from the config and the stage-in summary
    python -m mqi_communicator.remote.job --settings JSON|config.yaml --staged stage_in.json \\
        --beam B1 --record REC.json --result RESULT.json --log RULE.log

``--remote-output-dir`` defaults to the parameter file's OutputDir (and must equal it when
given). ``~`` and relative remote paths are taken from the remote login home. With
``--settings``: connection from ``hpc_connection``; ``remote_slurm.tps_env`` (empty:
``<paths.hpc.tps_env_dir>/tps_env``), the engine runs in ``paths.hpc.tps_env_dir``; partition,
gpu_request, account and max_wait_seconds from ``remote_slurm``; time limit from
``simulation.timeout_seconds``; ``--poll-max`` from ``application.polling_interval_seconds``;
remote input/OutputDir from the stage-in summary; job files in the parameter file's folder. The
job is named ``mqi_<pseudonym>_<beam>``: the case id never reaches squeue (`case_pseudonym`).

Exit codes: 0 success; 1 the beam failed (engine, outputs, max wait); 2 usage; 3 the cluster is
unreachable (transient; the job, if any, is still recorded: rerun to re-attach); 4 other errors
(host key, authentication, bad input, another controller holds the beam); 128 + N stopped by
signal N (SIGTERM/SIGINT while waiting: the job is cancelled, the record says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import posixpath
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mqi_communicator.files import is_stream_of
from mqi_communicator.remote.beam import RuleLog, read_remote_parameters, run_beam
from mqi_communicator.remote.commands import absolute, absolute_command, remote_home
from mqi_communicator.remote.connection import Connection, connect_from_config
from mqi_communicator.remote.errors import JobFailed, RemoteJobError, Stopped, TransferError, Unreachable
from mqi_communicator.remote.job_record import record_lock
from mqi_communicator.remote.slurm import PollOptions, StopFlag
from mqi_communicator.remote.slurm_script import GPU_REQUESTS, JobSpec, case_pseudonym

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_ERROR = 0, 1, 2, 3, 4


def _connect(args: argparse.Namespace, config: dict[str, Any] | None) -> Connection:
    """`connect_from_config` with ``hpc_connection`` (if any), explicit options winning."""
    hpc = dict((config or {}).get("hpc_connection", {}))
    explicit = {
        "host": args.host,
        "port": args.port,
        "user": args.user,
        "ssh_key_path": args.key,
        "known_hosts_path": args.known_hosts,
        "connect_timeout_seconds": args.connect_timeout,
        "retries": args.retries,
    }
    hpc.update({k: v for k, v in explicit.items() if v is not None})
    missing = [
        flag
        for flag, key in (
            ("--host", "host"),
            ("--user", "user"),
            ("--key", "ssh_key_path"),
            ("--known-hosts", "known_hosts_path"),
        )
        if not hpc.get(key)
    ]
    if missing:
        raise RemoteJobError(f"missing {', '.join(missing)} (or --settings with hpc_connection)")
    return connect_from_config(hpc)


def build_spec(
    args: argparse.Namespace, config: dict[str, Any] | None, conn: Connection
) -> tuple[JobSpec, PollOptions]:
    """The job and polling settings from explicit options, else from the config / stage-in summary."""
    home = remote_home(conn)
    remote_slurm = (config or {}).get("remote_slurm", {})
    hpc_paths = (config or {}).get("paths", {}).get("hpc", {})
    staged: dict[str, Any] = {}
    staged_beam: dict[str, Any] = {}
    if args.staged is not None:
        staged = json.loads(Path(args.staged).read_text())
        if not args.beam or args.beam not in staged.get("beams", {}):
            raise RemoteJobError(f"beam {args.beam!r} is not in the stage-in summary {args.staged}")
        staged_beam = staged["beams"][args.beam]

    pseudonym = case_pseudonym(str(staged.get("case_id", "")), str(remote_slurm.get("pseudonym_salt", "")))
    remote_input = args.remote_input or staged_beam.get("parameter_file")
    if not remote_input:
        raise RemoteJobError("missing --remote-input (or --staged with --beam)")
    remote_input = absolute(remote_input, home)
    beam = args.beam or posixpath.basename(remote_input).removeprefix("moqui_tps_").removesuffix(".in")
    beam = beam.removesuffix(".remote")

    output_dir = args.remote_output_dir or staged_beam.get("output_dir")
    if not output_dir:  # the parameter file says where the engine writes
        params = read_remote_parameters(conn, remote_input)
        output_dir = {k.lower(): v for k, v in params.items()}.get("outputdir")
        if not output_dir:
            raise RemoteJobError(f"{remote_input} has no OutputDir and no --remote-output-dir was given")
    workdir = args.remote_workdir or posixpath.dirname(remote_input)

    tps_env_dir = hpc_paths.get("tps_env_dir")
    tps_env = (
        args.tps_env or remote_slurm.get("tps_env") or (posixpath.join(tps_env_dir, "tps_env") if tps_env_dir else "")
    )
    if not tps_env:
        raise RemoteJobError("missing --tps-env (or remote_slurm.tps_env / paths.hpc.tps_env_dir in --settings)")
    moqui_dir = args.moqui_dir or tps_env_dir
    if not moqui_dir:
        raise RemoteJobError("missing --moqui-dir (or paths.hpc.tps_env_dir in --settings)")

    time_limit = args.time_limit
    if time_limit is None:
        timeout_s = (config or {}).get("simulation", {}).get("timeout_seconds")
        time_limit = math.ceil(float(timeout_s) / 60) if timeout_s else 60
    spec = JobSpec(
        beam=beam,
        remote_input=remote_input,
        remote_output_dir=absolute(output_dir, home),
        remote_workdir=absolute(workdir, home),
        tps_env=absolute_command(tps_env, home),
        moqui_dir=absolute(moqui_dir, home),
        partition=args.partition or remote_slurm.get("partition", "gpu"),
        gpu_request=args.gpu_request or remote_slurm.get("gpu_request", "gpu"),
        time_limit_min=int(time_limit),
        job_name=args.job_name or (f"mqi_{pseudonym}_{beam}" if args.staged is not None else ""),
        account=args.account if args.account is not None else remote_slurm.get("account", ""),
    )
    poll_max = args.poll_max
    if poll_max is None:
        poll_max = float((config or {}).get("application", {}).get("polling_interval_seconds", 300))
    max_wait = args.max_wait if args.max_wait is not None else remote_slurm.get("max_wait_seconds")
    options = PollOptions(
        min_interval=min(args.poll_min, poll_max),
        max_interval=poll_max,
        max_wait=float(max_wait) if max_wait is not None else None,
        unreachable_limit=args.unreachable_limit,
        command_timeout=args.command_timeout,
    )
    return spec, options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mqi_communicator.remote.job",
        description="Run one beam's MOQUI as a SLURM job over SSH: submit (or re-attach), poll, judge, "
        "append the remote engine log to --log, write a result JSON. Exit 0 ok, 1 beam failed, "
        "3 cluster unreachable (rerun re-attaches), 4 other error, 128+N stopped by signal N (job cancelled).",
    )
    c = p.add_argument_group("connection (default: hpc_connection of --settings)")
    c.add_argument("--host")
    c.add_argument("--port", type=int)
    c.add_argument("--user")
    c.add_argument("--key", help="private key file (unencrypted)")
    c.add_argument("--known-hosts", help="known_hosts file that must hold the host's key")
    c.add_argument("--connect-timeout", type=float)
    c.add_argument("--retries", type=int, help="retries after transient network errors")
    j = p.add_argument_group("the job (default: from --settings and --staged)")
    j.add_argument("--settings", help="config YAML path or inline JSON (as rules/remote.smk passes it)")
    j.add_argument("--staged", type=Path, help="stage-in summary JSON (remote parameter file and OutputDir per beam)")
    j.add_argument("--beam", help="beam name (default: from the parameter file name)")
    j.add_argument("--remote-input", help="the beam's MOQUI parameter file on the cluster")
    j.add_argument("--remote-output-dir", help="the beam's OutputDir (default: read from the parameter file)")
    j.add_argument("--remote-workdir", help="where the batch script, logs and .rc go (default: the input's folder)")
    j.add_argument("--tps-env", help="remote tps_env command")
    j.add_argument("--moqui-dir", help="remote folder the engine runs in")
    j.add_argument("--partition")
    j.add_argument("--gpu-request", choices=sorted(GPU_REQUESTS), help="gpu: --gpus=1; gres: --gres=gpu:1")
    j.add_argument("--time-limit", type=int, help="SLURM --time in minutes")
    j.add_argument("--account", help="SLURM account (sbatch --account)")
    j.add_argument("--job-name", help="SLURM job name (default mqi_<case pseudonym>_<beam> / mqi_<beam>)")
    o = p.add_argument_group("local files")
    o.add_argument("--record", type=Path, required=True, help="job record JSON (kept across runs: re-attach)")
    o.add_argument("--result", type=Path, required=True, help="result JSON, written on success")
    o.add_argument("--log", type=Path, help="rule log: progress lines and the remote logs are appended")
    w = p.add_argument_group("waiting")
    w.add_argument("--poll-min", type=float, default=1.0, help="first poll interval (s)")
    w.add_argument("--poll-max", type=float, help="longest poll interval (s; default polling_interval_seconds)")
    w.add_argument("--max-wait", type=float, help="cancel and fail after this many s since submission")
    w.add_argument("--unreachable-limit", type=float, default=900.0, help="give up after this many s without answer")
    w.add_argument("--command-timeout", type=float, default=60.0, help="timeout of each remote command (s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Under the workflow, stderr is the rule's log already: the lines go there once, not twice.
    log = RuleLog(args.log, echo=None if args.log and is_stream_of(sys.stderr, args.log) else sys.stderr)
    stop = StopFlag().install()
    try:
        config = None
        if args.settings:
            from mqi_communicator import settings

            config = settings.load(args.settings)
        with record_lock(args.record), _connect(args, config) as conn:
            spec, options = build_spec(args, config, conn)
            result = run_beam(
                conn, spec, record_path=args.record, result_path=args.result, log=log, options=options, stop=stop
            )
        print(json.dumps(result, indent=1))
        return EXIT_OK
    except Stopped as exc:
        log(f"REMOTE JOB CANCELLED: {exc}")
        return 128 + exc.signum
    except JobFailed as exc:
        log(f"REMOTE JOB FAILED: {exc}")
        return EXIT_FAILED
    except Unreachable as exc:
        log(f"REMOTE JOB UNREACHABLE: {exc}")
        return EXIT_UNREACHABLE
    except TransferError as exc:
        log(f"REMOTE JOB ERROR: {exc}")
        return EXIT_UNREACHABLE if exc.transient else EXIT_ERROR
    except (RemoteJobError, ValueError, OSError) as exc:  # a KeyError, TypeError ... is a bug: its traceback
        log(f"REMOTE JOB ERROR: {exc}")
        return EXIT_ERROR
    finally:
        stop.restore()


if __name__ == "__main__":
    # What the imports made (paramiko, cryptography, ...) lives until exit: frozen, the garbage
    # collector never walks it again, nor at interpreter shutdown (measured 25 -> 7 ms).
    gc.freeze()
    sys.exit(main())

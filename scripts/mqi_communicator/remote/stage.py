"""The remote deployment's staging: P2 output and per-beam MOQUI inputs up to the cluster
(stage in), a beam's raw dose back (stage out), over one verified SSH connection.

    python -m mqi_communicator.remote.stage stage-in  --case C --processing DIR --beam=B1 --beam=B2 --report J
    python -m mqi_communicator.remote.stage stage-out --result R --output-raw RAW --record J

Remote layout, per case (`paths.hpc`, `~` = the remote user's home):

    <output_csv_dir>/moqui_csv/{plan,log}/...       P2 output, as locally
    <output_csv_dir>/moqui/<beam>/log/...           the beam's logFilePath (padding + CSVs)
    <output_csv_dir>/moqui/<beam>/moqui_tps_<beam>.remote.in   its parameter file, remote paths
    <dose_raw_dir>/<beam>/                          the beam's OutputDir

MOQUI does not expand `~`, so every path written into a parameter file is absolute.
"""

from __future__ import annotations

import argparse
import gc
import json
import posixpath
import sys
import time
from pathlib import Path
from typing import Any

from mqi_communicator import cli, settings
from mqi_communicator.errors import InputError
from mqi_communicator.files import KnownDigests, write_atomic, write_json_atomic
from mqi_communicator.remote.commands import absolute, remote_home, run
from mqi_communicator.remote.connection import Connection, connect_from_config
from mqi_communicator.remote.download import download_file
from mqi_communicator.remote.errors import TransferError
from mqi_communicator.remote.upload import upload_tree

REMOTE_SUFFIX = ".remote.in"
#: The case's processing folders that go to the cluster (P2's output, the beams' MOQUI inputs)
STAGED = ("moqui_csv", "moqui")
#: P2's summary in its output folder (rules/interpret.smk), with the sha256 of every file it wrote
P2_SUMMARY = "p2_summary.json"


def connect(config: dict[str, Any]) -> Connection:
    """The connection `hpc_connection` describes: key only, host key checked against known_hosts."""
    return connect_from_config(config["hpc_connection"])


def remote_case_dirs(config: dict[str, Any], case_id: str, home: str) -> tuple[str, str]:
    hpc = config["paths"]["hpc"]
    return (
        absolute(hpc["output_csv_dir"].replace("{case_id}", case_id), home),
        absolute(hpc["dose_raw_dir"].replace("{case_id}", case_id), home),
    )


def remote_parameters(local_in: Path, processing: Path, remote_root: str, remote_output_dir: str) -> str:
    """The beam's parameter file with every local path replaced by its remote counterpart."""
    # imported here: it pulls in the plan reader (pydicom, numpy), which stage-out never needs
    from mqi_communicator.formats.moqui_parameters import (
        parse_parameter_file,
        parse_parameters,
        render_parameter_file,
        validate_parameters,
    )

    params = parse_parameter_file(local_in)
    local_root = str(processing.resolve())
    moved: dict[str, object] = {"OutputDir": remote_output_dir}
    for key in ("ParentDir", "DicomDir", "DicomPath", "logFilePath"):
        if key in params:
            value = params[key]
            if not value.startswith(local_root):
                raise InputError(f"{local_in}: {key} {value} is not under the case's processing folder {local_root}")
            moved[key] = remote_root + value[len(local_root) :]
    text = render_parameter_file(params, moved, header=f"remote copy of {local_in.name}")
    validate_parameters(parse_parameters(text, f"{local_in} (remote copy)"), str(local_in))
    return text


def p2_digests(processing: Path) -> KnownDigests:
    """The sha256 P2 recorded of the files it wrote (its summary's "files"), so that stage-in does
    not hash them again; the beams' logFilePath folders hold hard links of the same files. Empty
    when P2 recorded none (an external interpreter, or P2 output from before it recorded them)."""
    summary = processing / "moqui_csv" / P2_SUMMARY
    return KnownDigests.load(summary) if summary.is_file() else KnownDigests()


def stage_in(config: dict[str, Any], case_id: str, processing: Path, beams: list[str], report: Path) -> dict[str, Any]:
    """Upload the case's P2 output and each beam's MOQUI input; idempotent and verified."""
    started = time.monotonic()
    with connect(config) as conn:
        home = remote_home(conn)
        root, dose_root = remote_case_dirs(config, case_id, home)
        beam_entries = {}
        for beam in beams:
            local_in = processing / "moqui" / beam / f"moqui_tps_{beam}.in"
            output_dir = posixpath.join(dose_root, beam)
            remote_in = local_in.with_name(local_in.stem + REMOTE_SUFFIX)
            write_atomic(remote_in, remote_parameters(local_in, processing, root, output_dir).encode())
            beam_entries[beam] = {
                "parameter_file": posixpath.join(root, "moqui", beam, remote_in.name),
                "output_dir": output_dir,
            }
        # One stream for both folders: the beams' logFilePath files are hard links of P2's CSVs,
        # sent once (the cluster gets the same links).
        upload = upload_tree(conn, processing, root, known=p2_digests(processing), only=STAGED).to_dict()
        mkdirs = run(conn, ["mkdir", "-p", *(e["output_dir"] for e in beam_entries.values())], timeout=60)
        if mkdirs.rc != 0:
            raise TransferError(f"cannot create remote output folders: {mkdirs.stderr.strip()}")
    summary = {
        "case_id": case_id,
        "host": config["hpc_connection"]["host"],
        "remote_root": root,
        "remote_dose_root": dose_root,
        "beams": beam_entries,
        "upload": upload,
        "seconds": round(time.monotonic() - started, 3),
    }
    write_json_atomic(report, summary)
    return summary


def stage_out(config: dict[str, Any], result_path: Path, output_raw: Path, record_path: Path) -> dict[str, Any]:
    """Download the beam's raw dose, verified against the sha256 computed on the cluster."""
    result = json.loads(result_path.read_text())
    started = time.monotonic()
    with connect(config) as conn:
        sha = download_file(conn, result["remote_raw"], output_raw, expected_sha256=result["sha256"])
    record = {
        "beam_number": result["beam_number"],
        "beam_name": result["beam_name"],
        "parameter_file": result["remote_input"],
        "engine": result["tps_env"],
        "engine_output": posixpath.basename(result["remote_raw"]),
        "raw": str(output_raw),
        "bytes": output_raw.stat().st_size,
        "sha256": sha,
        "gpu": 0,
        "slurm_job_id": result["job_id"],
        "slurm_partition": result.get("partition"),
        "cuda_visible_devices": result.get("cuda_visible_devices"),
        "host": config["hpc_connection"]["host"],
        "seconds": result.get("seconds"),
        "download_seconds": round(time.monotonic() - started, 3),
    }
    write_json_atomic(record_path, record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.remote.stage",
        description="Stage a case to the remote cluster and its doses back (SFTP).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("stage-in", help="upload P2 output and the beams' MOQUI inputs")
    up.add_argument("--case", required=True)
    up.add_argument("--processing", type=Path, required=True, help="the case's processing folder")
    # One option per beam, given as --beam=NAME: a beam name may begin with '-'.
    up.add_argument("--beam", dest="beams", action="append", required=True, help="a beam folder name (one per beam)")
    up.add_argument("--report", type=Path, required=True, help="stage-in summary (JSON)")
    down = sub.add_parser("stage-out", help="download one beam's raw dose")
    down.add_argument("--result", type=Path, required=True, help="the remote job's result JSON")
    down.add_argument("--output-raw", type=Path, required=True)
    down.add_argument("--record", type=Path, required=True)
    for p in (up, down):
        settings.add_argument(p)
    return cli.run(parser, _stage, argv, step="remote.stage", label="STAGE", subject=lambda a: a.command)


def _stage(args: argparse.Namespace) -> int:
    config = settings.load(args.settings)
    if args.command == "stage-in":
        summary = stage_in(config, args.case, args.processing, args.beams, args.report)
        sent = len(summary["upload"]["uploaded"])
        print(f"staged case {args.case} to {summary['host']}:{summary['remote_root']} ({sent} files sent)")
    else:
        record = stage_out(config, args.result, args.output_raw, args.record)
        print(f"downloaded {record['engine_output']} ({record['bytes']} bytes, sha256 verified)")
    return 0


if __name__ == "__main__":
    # What the imports made (paramiko, cryptography, ...) lives until exit: frozen, the garbage
    # collector never walks it again, nor at interpreter shutdown (measured 25 -> 7 ms).
    gc.freeze()
    sys.exit(main())

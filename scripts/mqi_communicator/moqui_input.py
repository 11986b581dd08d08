"""A case's per-beam MOQUI input: the parameter file `moqui_tps_<beam>.in` with the per-beam
keys filled into the configured template, and the beam's own `logFilePath` laid out for the
engine build's folder selection (see `moqui_input.prepare_beam_logdir`).

GPUID is written as 0 here; the simulate step writes the device it actually holds into the
run copy of the file (under SLURM the job's GPU is always device 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mqi_communicator import cli, settings
from mqi_communicator.errors import InputError
from mqi_communicator.files import write_atomic
from mqi_communicator.formats import contracts
from mqi_communicator.formats.contracts import IntakeManifest, ManifestBeam
from mqi_communicator.formats.moqui_parameters import (
    parse_parameters,
    prepare_beam_logdir,
    render_parameter_file,
    validate_parameters,
)

GANTRY_NUMBER = {"G1": 1, "G2": 2}


def beam_parameters(
    manifest: IntakeManifest,
    beam: ManifestBeam,
    p2_dir: Path,
    logdir: Path,
    output_dir: Path,
    simulation: dict[str, Any],
) -> dict[str, object]:
    """The per-beam keys (absolute paths: the engine runs in its own folder)."""
    keys: dict[str, object] = {
        "GPUID": 0,
        "BeamNumbers": beam["number"],
        # MOQUI silently treats any value other than 1 as 2, so it comes from the room, validated.
        "GantryNum": GANTRY_NUMBER[manifest["room"]],
        "ParentDir": p2_dir.resolve(),
        "DicomDir": (p2_dir / "plan").resolve(),
        "logFilePath": logdir.resolve(),
        "OutputDir": output_dir.resolve(),
        "TwoCentimeterMode": simulation["dose_type"] == "2d",
    }
    if simulation["log_file_selection"] != "index":
        keys["LogFileSelection"] = simulation["log_file_selection"]
    return keys


def write_beam_input(
    manifest: IntakeManifest,
    beam_folder: str,
    p2_dir: Path,
    parameters_path: Path,
    logdir: Path,
    output_dir: Path,
    simulation: dict[str, Any],
) -> Path:
    beam = next((b for b in manifest["beams"] if b["sanitized_name"] == beam_folder and b["simulate"]), None)
    if beam is None:
        raise InputError(f"case {manifest['case_id']}: no simulated beam with folder {beam_folder!r}")
    per_beam = beam_parameters(manifest, beam, p2_dir, logdir, output_dir, simulation)
    header = f"case {manifest['case_id']}, beam {beam['number']} ({beam['name']}), written by mqi_communicator"
    text = render_parameter_file(simulation["template"], per_beam, header=header)
    validate_parameters(parse_parameters(text, str(parameters_path)), str(parameters_path))
    prepare_beam_logdir(p2_dir / "log" / beam_folder, beam["number"], logdir, simulation["log_file_selection"])
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(parameters_path, text.encode())
    return parameters_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.moqui_input",
        description="Write one beam's MOQUI parameter file and log folder for a case.",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="the case's intake.json")
    parser.add_argument("--p2", type=Path, required=True, help="the case's P2 output folder (plan/, log/)")
    parser.add_argument("--beam", required=True, help="the beam's folder name in P2 output (sanitized beam name)")
    parser.add_argument("--parameters", type=Path, required=True, help="parameter file to write")
    parser.add_argument("--logdir", type=Path, required=True, help="the beam's logFilePath to lay out")
    parser.add_argument("--output-dir", type=Path, required=True, help="the beam's OutputDir")
    settings.add_argument(parser)
    return cli.run(
        parser, _moqui_input, argv, step="moqui_input", label="MOQUI input", subject=lambda a: f"beam {a.beam}"
    )


def _moqui_input(args: argparse.Namespace) -> int:
    config = settings.load(args.settings)
    manifest = contracts.read_manifest(args.manifest)
    path = write_beam_input(
        manifest, args.beam, args.p2, args.parameters, args.logdir, args.output_dir, config["simulation"]
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

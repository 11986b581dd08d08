"""P2: delivery logs (or the plan's spots) -> MOQUI CSVs, the layout of mqi_interpreter (docs/design.md#moqui-csv).

    <out>/plan/<RT plan file name>
    <out>/log/<sanitized BeamName>/<NN>_<E:.2f>MeV.csv     NN = the plan's layer number

Deliveries are paired with beams by the manifest's DICOM_BEAM_NUMBER, never by folder order.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mqi_communicator import cli, settings
from mqi_communicator.errors import CaseError
from mqi_communicator.files import KnownDigests, atomic_output, write_json_atomic
from mqi_communicator.formats import contracts, moqui_csv, ptn
from mqi_communicator.formats.log_csv import LogCsvEncoder
from mqi_communicator.intake.fractions import layer_parts

if TYPE_CHECKING:
    from mqi_communicator.formats.plan import Beam, Layer

# Start-up is a large share of P2's time on a clinical case (docs/p2-speed.md): what only some
# runs need is imported where it is used. Log mode never reads the plan with pydicom: the
# manifest carries each beam's name and layer energies, read by intake from this very plan (P2
# checks its sha256 first); only plan mode, which needs the spots, reads it.


def _spot_samples(spot_mu: np.ndarray, calibration: ptn.RoomCalibration, config: dict[str, Any]) -> np.ndarray:
    """Plan mode's samples per spot: its MU at the plan dose rate, one sample per TIMEGAIN."""
    mu_per_sample = config["interpreter"]["plan_dose_rate_mu_per_s"] * calibration.timegain_ms / 1000.0
    return np.maximum(1, np.ceil(spot_mu / mu_per_sample).astype(np.int64))


def plan_sample_refusal(beam: Beam, calibration: ptn.RoomCalibration, config: dict[str, Any]) -> str | None:
    """Why plan mode will not write a beam's CSVs: more samples than `plan_max_samples_per_beam`.
    A plan on another machine's MU scale (hundreds of MU a spot where the clinic's rooms give
    hundredths), or a dose rate set far too low, would otherwise fill the disk with gigabytes of
    CSV before anything could say the plan does not fit (docs/real-plans.md)."""
    limit = int(config["interpreter"]["plan_max_samples_per_beam"])
    total = sum(
        int(_spot_samples(np.asarray(layer.spot_mu, dtype=np.float64), calibration, config).sum())
        for layer in beam.layers
    )
    if total <= limit:
        return None
    return (
        f"beam {beam.number} ({beam.name!r}): plan mode would write {total:,} samples "
        f"(about {total * 32 / 1e9:.1f} GB of CSV) for its {sum(layer.mu for layer in beam.layers):g} MU at "
        f"interpreter.plan_dose_rate_mu_per_s {config['interpreter']['plan_dose_rate_mu_per_s']:g}, more than "
        f"interpreter.plan_max_samples_per_beam ({limit:,}): is the plan for this room's MU scale?"
    )


def plan_layer_samples(layer: Layer, calibration: ptn.RoomCalibration, config: dict[str, Any]) -> bytes:
    """Plan-based mode: each spot held at its position for MU / dose rate, sampled at TIMEGAIN."""
    interp = config["interpreter"]
    spot_mu = np.asarray(layer.spot_mu, dtype=np.float64)
    samples = _spot_samples(spot_mu, calibration, config)
    xy = np.repeat(np.asarray(layer.spot_xy_mm, dtype=np.float64).reshape(-1, 2), samples, axis=0)
    # Spread each spot's MU evenly over its samples; counts are in dose1 units at range factor 1.
    mu = np.repeat(spot_mu / samples, samples)
    # Counts as the monitor would have counted them at this energy (docs/log-plan-frame.md), so
    # that the engine's count -> protons conversion treats plan and log CSVs alike.
    mu_per_count = calibration.mu_per_count(layer.energy_mev)
    counts = np.rint(mu / (mu_per_count * interp["dose_dividing_factor"])).astype(np.int64)
    time_ms = np.arange(len(xy)) * calibration.timegain_ms
    return moqui_csv.encode_values(time_ms, xy[:, 0], xy[:, 1], counts, interp["csv_layout"])


def _read_log(path: Path, size: int) -> np.ndarray:
    """A layer's PTN rows as logged (big-endian; the encoder needs no byte swap), checked against
    the size intake recorded."""
    data = path.read_bytes()
    if len(data) != size:
        raise CaseError(path, "changed since intake; run the case again")
    return ptn.rows_of(data, path)


class _OutputFiles:
    """Writes P2's files atomically and records each one's sha256 (of the bytes in hand, hashed
    where they are, not copied) in `known`: stage-in reports these digests instead of reading the
    files again to hash them. (Writing and hashing in a second thread while the next layer is
    encoded measured no faster on a loaded 2-core machine and cost CPU: docs/p2-speed.md.)"""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.known = KnownDigests()

    def write(self, path: Path, data: bytes | memoryview) -> None:
        with atomic_output(path) as handle:
            handle.write(data)
        self.known.add(path, path.relative_to(self.out_dir).as_posix(), hashlib.sha256(data).hexdigest())


def interpret_case(manifest: dict[str, Any], config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write the P2 layout for every simulated beam; returns a summary (files, samples)."""
    case_dir = Path(manifest["case_dir"])
    plan_path = case_dir / manifest["plan"]["path"]
    plan_bytes = plan_path.read_bytes()  # the bytes checked are the bytes copied
    if hashlib.sha256(plan_bytes).hexdigest() != manifest["plan"]["sha256"]:
        raise CaseError(plan_path, "changed since intake; run the case again")
    calibration = ptn.RoomCalibration.from_config(config["rooms"][manifest["room"]])
    layout = config["interpreter"]["csv_layout"]
    summary: dict[str, Any] = {"case_id": manifest["case_id"], "mode": manifest["mode"], "layout": layout}
    simulated = [b for b in manifest["beams"] if b["simulate"]]
    names = [b["sanitized_name"] for b in simulated]
    if len(names) != len(set(names)):
        raise CaseError(plan_path, f"two beams share a folder name after sanitizing: {names}")
    files = _OutputFiles(out_dir)
    files.write(out_dir / "plan" / plan_path.name, plan_bytes)
    if manifest["mode"] == "plan":
        summary["beams"] = _plan_beams(plan_path, simulated, calibration, config, files)
    else:
        summary["beams"] = _log_beams(manifest, simulated, calibration, config, files)
    summary["files"] = files.known.entries
    return summary


def _plan_beams(
    plan_path: Path,
    simulated: list[dict[str, Any]],
    calibration: ptn.RoomCalibration,
    config: dict[str, Any],
    files: _OutputFiles,
) -> list[dict[str, Any]]:
    from mqi_communicator.formats.plan import read_plan

    plan = read_plan(plan_path)
    beams = []
    for beam_entry in simulated:
        beam = plan.beam(beam_entry["number"])
        assert beam is not None  # intake checked every beam number against the plan
        if refusal := plan_sample_refusal(beam, calibration, config):
            raise CaseError(plan_path, refusal)
        beam_dir = files.out_dir / "log" / beam_entry["sanitized_name"]
        beam_dir.mkdir(parents=True, exist_ok=True)
        written: list[dict[str, Any]] = []
        for number, layer in enumerate(beam.layers, start=1):
            data = plan_layer_samples(layer, calibration, config)
            name = moqui_csv.layer_file_name(number, layer.energy_mev, len(beam.layers))
            files.write(beam_dir / name, data)
            written.append({"file": name, "layer": number, "bytes": len(data)})
        beams.append({"number": beam.number, "name": beam.name, "folder": beam_dir.name, "layers": written})
    return beams


def _plan_energies(manifest: dict[str, Any], beam_number: int) -> list[float]:
    """A beam's layer energies from the plan, for a manifest that does not carry them (intake
    writes them, read from this very plan; the contract leaves them optional)."""
    from mqi_communicator.formats.plan import read_plan

    beam = read_plan(Path(manifest["case_dir"]) / manifest["plan"]["path"]).beam(beam_number)
    assert beam is not None  # intake checked every beam number against the plan
    return [layer.energy_mev for layer in beam.layers]


def _log_beams(
    manifest: dict[str, Any],
    simulated: list[dict[str, Any]],
    calibration: ptn.RoomCalibration,
    config: dict[str, Any],
    files: _OutputFiles,
) -> list[dict[str, Any]]:
    case_dir = Path(manifest["case_dir"])
    interp = config["interpreter"]
    encoder = LogCsvEncoder(
        calibration, config["monitor_range_factors"], interp["dose_dividing_factor"], interp["csv_layout"]
    )
    deliveries = {d["folder"]: d for d in manifest["deliveries"]}
    beams = []
    for beam_entry in simulated:
        energies = beam_entry.get("energies_mev") or _plan_energies(manifest, beam_entry["number"])
        beam_dir = files.out_dir / "log" / beam_entry["sanitized_name"]
        beam_dir.mkdir(parents=True, exist_ok=True)
        # A layer interrupted and resumed is logged in two deliveries: its CSV is both logs,
        # in delivery order, its rows numbered on (docs/fractions.md). The layer number is the
        # one intake read from the PTN's name, never its sorted position.
        layers = [
            (
                number,
                parts,
                encoder.layer(
                    [(_read_log(case_dir / p.folder / p.file, p.entry["size"]), p.range_code) for p in parts]
                ),
            )
            for number, parts in layer_parts(deliveries[f] for f in beam_entry["simulated_deliveries"]).items()
        ]
        encoder.include([layer_rows for *_, layer_rows in layers])  # the beam's values formatted in one go
        written = []
        for number, parts, layer_rows in layers:
            name = moqui_csv.layer_file_name(number, energies[number - 1], len(energies))
            files.write(beam_dir / name, encoder.encode_layer(layer_rows).data)  # written and hashed in place
            written.append(
                {
                    "file": name,
                    "layer": number,
                    "samples": len(layer_rows.x),
                    "ptn": " + ".join(f"{part.folder}/{part.file}" for part in parts),
                }
            )
        beams.append(
            {"number": beam_entry["number"], "name": beam_entry["name"], "folder": beam_dir.name, "layers": written}
        )
    return beams


def check_layout(manifest: dict[str, Any], out_dir: Path) -> None:
    """Verify P2 output (ours or an external interpreter's) has the layout later steps rely on."""
    plan_copy = out_dir / "plan" / manifest["plan"]["file_name"]
    if not plan_copy.is_file():
        raise CaseError(plan_copy, "missing plan copy in P2 output")
    for beam in manifest["beams"]:
        if not beam["simulate"]:
            continue
        beam_dir = out_dir / "log" / beam["sanitized_name"]
        files = sorted(beam_dir.glob("*.csv")) if beam_dir.is_dir() else []
        if not files:
            raise CaseError(beam_dir, f"no layer CSVs for beam {beam['number']} ({beam['name']!r})")
        numbers = []
        for path in files:
            try:
                moqui_csv.energy_of_file_name(path.name)
            except ValueError as exc:
                raise CaseError(path, str(exc)) from exc
            numbers.append(int(path.name.split("_", 1)[0]))
        if numbers != sorted(numbers):
            # The engine reads the files in name order; it must be layer order.
            raise CaseError(beam_dir, f"layer CSV names do not sort in layer order: {[p.name for p in files]}")


def run_external(manifest: dict[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    """The clinic's mqi_interpreter through its own CLI, then the same layout check."""
    import shlex
    import subprocess

    exe = config["executables"]
    if not exe["mqi_interpreter"]:
        raise CaseError(None, "interpreter.mode is 'external' but executables.mqi_interpreter is empty")
    command = [
        *shlex.split(exe["python_interpreter"]),
        exe["mqi_interpreter"],
        "--logdir",
        manifest["case_dir"],
        "--outputdir",
        str(out_dir),
    ]
    print("running:", shlex.join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise CaseError(None, f"external mqi_interpreter exited with {result.returncode}")
    check_layout(manifest, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.interpret",
        description="P2: convert a case's PTN delivery logs (or plan spots) to MOQUI CSVs (mqi_interpreter layout).",
    )
    parser.add_argument("--logdir", type=Path, required=True, help="the case folder (plan + delivery folders)")
    parser.add_argument("--outputdir", type=Path, required=True, help="P2 output folder (plan/ and log/)")
    parser.add_argument("--manifest", type=Path, help="intake.json from P1; built from --logdir when omitted")
    settings.add_argument(parser)
    parser.add_argument("--summary", type=Path, help="write a JSON summary of the files written")
    return cli.run(parser, _interpret, argv, step="interpret", label="P2", subject=lambda a: f"case {a.logdir.name}")


def _interpret(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = settings.load(args.settings)
    if args.manifest:
        manifest = contracts.read("intake", args.manifest)
    else:
        from mqi_communicator.intake.case import build_manifest

        manifest = build_manifest(args.logdir, config)
    if config["interpreter"]["mode"] == "external":
        run_external(manifest, config, args.outputdir)
        summary: dict[str, Any] = {"case_id": manifest["case_id"], "mode": "external"}
    else:
        summary = interpret_case(manifest, config, args.outputdir)
        check_layout(manifest, args.outputdir)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if args.summary:
        write_json_atomic(args.summary, summary)
    files = sum(len(b["layers"]) for b in summary.get("beams", []))
    print(f"case {manifest['case_id']}: {files} layer files in {args.outputdir} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

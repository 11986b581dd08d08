"""P2: delivery logs (or the plan's spots) -> MOQUI CSVs, the layout of mqi_interpreter (docs/design.md#moqui-csv).

    <out>/plan/<RT plan file name>
    <out>/log/<sanitized BeamName>/<NN>_<E:.2f>MeV.csv     NN = the plan's layer number

Deliveries are paired with beams by the manifest's DICOM_BEAM_NUMBER, never by folder order.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mqi_communicator import cli, settings
from mqi_communicator.errors import CaseError
from mqi_communicator.files import KnownDigests, write_atomic, write_json_atomic
from mqi_communicator.formats import contracts, moqui_csv, ptn
from mqi_communicator.formats.plan import Beam, Layer, read_plan
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.intake.fractions import layer_parts

TABLE_SIZE = 1 << 16  # every possible uint16 raw value


@dataclass
class LogTables:
    """Byte-string tables from raw PTN values to CSV text, built once per case and room."""

    x: np.ndarray
    y: np.ndarray
    counts: dict[int, np.ndarray]  # per DOSE1_RANGE code
    time: np.ndarray
    timegain_ms: float
    layout: str

    @classmethod
    def build(
        cls, calibration: ptn.RoomCalibration, range_factors: list[float], dividing: float, layout: str
    ) -> LogTables:
        raw = np.arange(TABLE_SIZE)
        # x and y go through float32 exactly like mqi_interpreter's float32 columns.
        x = moqui_csv.float_table(calibration.x_mm(raw), layout)
        y = moqui_csv.float_table(calibration.y_mm(raw), layout)
        counts = {
            code: moqui_csv.int_table(np.rint(raw * factor / dividing))
            for code, factor in enumerate(range_factors, start=1)
        }
        return cls(x=x, y=y, counts=counts, time=np.empty(0, "S1"), timegain_ms=calibration.timegain_ms, layout=layout)

    def time_table(self, rows: int) -> np.ndarray:
        if len(self.time) < rows:
            self.time = moqui_csv.float_table(np.arange(max(rows, 2 * len(self.time))) * self.timegain_ms, self.layout)
        return self.time

    def encode(self, log: np.ndarray, range_code: int, first_row: int = 0) -> bytes:
        """The rows' CSV text; `first_row` numbers them on after an earlier part of the layer."""
        index = np.arange(first_row, first_row + len(log))
        return moqui_csv.encode(
            [
                (self.time_table(first_row + len(log)), index),
                (self.x, log[:, 0]),
                (self.y, log[:, 1]),
                (self.counts[range_code], log[:, 4]),
            ],
            self.layout,
        )


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


def interpret_case(manifest: dict[str, Any], config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write the P2 layout for every simulated beam; returns a summary (files, samples)."""
    case_dir = Path(manifest["case_dir"])
    plan_path = case_dir / manifest["plan"]["path"]
    plan_bytes = plan_path.read_bytes()  # the bytes checked are the bytes copied
    if hashlib.sha256(plan_bytes).hexdigest() != manifest["plan"]["sha256"]:
        raise CaseError(plan_path, "changed since intake; run the case again")
    plan = read_plan(plan_path)
    calibration = ptn.RoomCalibration.from_config(config["rooms"][manifest["room"]])
    layout = config["interpreter"]["csv_layout"]
    # Every file written is recorded with its sha256 (of the bytes in hand) in the summary's
    # "files": stage-in reports these digests instead of reading the files again to hash them.
    known = KnownDigests()

    def write_output(path: Path, data: bytes) -> None:
        write_atomic(path, data)
        known.add(path, path.relative_to(out_dir).as_posix(), hashlib.sha256(data).hexdigest())

    write_output(out_dir / "plan" / plan_path.name, plan_bytes)
    deliveries = {d["folder"]: d for d in manifest["deliveries"]}
    tables: LogTables | None = None
    summary: dict[str, Any] = {"case_id": manifest["case_id"], "mode": manifest["mode"], "layout": layout, "beams": []}
    names = [b["sanitized_name"] for b in manifest["beams"] if b["simulate"]]
    if len(names) != len(set(names)):
        raise CaseError(plan_path, f"two beams share a folder name after sanitizing: {names}")
    for beam_entry in manifest["beams"]:
        if not beam_entry["simulate"]:
            continue
        beam = plan.beam(beam_entry["number"])
        assert beam is not None  # intake checked every beam number against the plan
        beam_dir = out_dir / "log" / beam_entry["sanitized_name"]
        beam_dir.mkdir(parents=True, exist_ok=True)
        written: list[dict[str, Any]] = []
        if manifest["mode"] == "plan":
            if refusal := plan_sample_refusal(beam, calibration, config):
                raise CaseError(plan_path, refusal)
            for number, layer in enumerate(beam.layers, start=1):
                data = plan_layer_samples(layer, calibration, config)
                name = moqui_csv.layer_file_name(number, layer.energy_mev, len(beam.layers))
                write_output(beam_dir / name, data)
                written.append({"file": name, "layer": number, "bytes": len(data)})
        else:
            if tables is None:
                tables = LogTables.build(
                    calibration, config["monitor_range_factors"], config["interpreter"]["dose_dividing_factor"], layout
                )
            simulated = [deliveries[folder] for folder in beam_entry["simulated_deliveries"]]
            # A layer interrupted and resumed is logged in two deliveries: its CSV is both logs,
            # in delivery order, its rows numbered on (docs/fractions.md).
            for number, parts in layer_parts(simulated).items():
                # The layer intake read from the PTN's name, never its sorted position.
                chunks, samples = [], 0
                for part in parts:
                    path = case_dir / part.folder / part.file
                    if path.stat().st_size != part.entry["size"]:
                        raise CaseError(path, "changed since intake; run the case again")
                    log = ptn.read_ptn(path)
                    chunks.append(tables.encode(log, part.range_code, first_row=samples))
                    samples += len(log)
                data = moqui_csv.join(chunks, layout)
                name = moqui_csv.layer_file_name(number, beam.layers[number - 1].energy_mev, len(beam.layers))
                write_output(beam_dir / name, data)
                written.append(
                    {
                        "file": name,
                        "layer": number,
                        "samples": samples,
                        "ptn": " + ".join(f"{part.folder}/{part.file}" for part in parts),
                    }
                )
        summary["beams"].append({"number": beam.number, "name": beam.name, "folder": beam_dir.name, "layers": written})
    summary["files"] = known.entries
    return summary


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
    manifest = contracts.read("intake", args.manifest) if args.manifest else build_manifest(args.logdir, config)
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

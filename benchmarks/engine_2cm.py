"""Benchmark: the built-in engine on one clinical-size beam in TwoCentimeterMode.

Run: `.venv/bin/python benchmarks/engine_2cm.py` (from the repository root). It writes a
synthetic line-scanned beam (35 layers, ~1 M samples, CSVs in a temporary folder), runs the
engine 5 times through its CLI exactly as the pipeline does (a subprocess, so interpreter start
and imports count), and prints the median wall time against the 2 s target, plus the ratio to a
naive reference measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))  # the synthetic plan writer lives in tests/

from results_log import recorded  # noqa: E402  (benchmarks/, beside this file)

from mqi_communicator import files  # noqa: E402
from mqi_communicator.formats import moqui_csv, moqui_parameters  # noqa: E402
from mqi_communicator.formats.raw_dose import PLANE_2CM, PLANE_DEPTH_MM  # noqa: E402
from mqi_communicator.simulate import engine  # noqa: E402
from tests import casegen  # noqa: E402

TARGET_S = 2.0
LAYERS = 35
SAMPLES = 1_000_000
TIME_GAIN_MS = 0.06
X_GAIN_MM, Y_GAIN_MM = 0.0072600, 0.0071411  # G2 PTN position quantization
BEAM_OFF_XY = (294.676086, -232.70784)  # where the G2 log parks beam-off samples


def write_plan(path: Path, energies: list[float]) -> None:
    """A minimal RT Ion Plan: one G2 beam `BENCH:1`, number 1, one spot per layer (the engine
    takes the beam's name and room from the plan; the spots come from the CSVs)."""
    beam = casegen.BeamSpec(1, "BENCH:1", energies, [[(0.0, 0.0)]] * len(energies))
    casegen.write_plan(
        path, casegen.CaseSpec(patient_id="BENCH", room="G2", beams=[beam], isocenter_mm=(0.0, 0.0, 0.0))
    )


def synthetic_layer(rng: np.random.Generator, n: int, radius_mm: float) -> np.ndarray:
    """One line-scanned layer: a 5 mm spot grid inside a circle, serpentine order, dwell
    samples around each spot, transit samples between spots, 2 % beam-off rows parked."""
    grid = np.arange(-radius_mm, radius_mm + 0.1, 5.0)
    spots = [
        (x, y)
        for j, y in enumerate(grid)
        for x in (grid if j % 2 == 0 else grid[::-1])
        if x * x + y * y <= radius_mm**2
    ]
    spots_xy = np.array(spots)
    n_off = n // 50
    per_spot = (n - n_off) // len(spots_xy)
    dwell = max(per_spot * 4 // 5, 1)
    rows = []
    for k, (x, y) in enumerate(spots_xy):
        jitter = rng.normal(0.0, 0.2, (dwell, 2))
        counts = rng.poisson(120, dwell)
        rows.append(np.column_stack([x + jitter[:, 0], y + jitter[:, 1], counts]))
        nxt = spots_xy[(k + 1) % len(spots_xy)]
        steps = per_spot - dwell
        frac = (np.arange(steps) + 1) / (steps + 1)
        rows.append(np.column_stack([x + (nxt[0] - x) * frac, y + (nxt[1] - y) * frac, rng.poisson(5, steps)]))
    on = np.concatenate(rows)
    off = np.column_stack(
        [np.full(n - len(on), BEAM_OFF_XY[0]), np.full(n - len(on), BEAM_OFF_XY[1]), rng.poisson(20, n - len(on))]
    )
    xyc = np.concatenate([off[: len(off) // 2], on, off[len(off) // 2 :]])
    xyc[:, 0] = np.round(xyc[:, 0] / X_GAIN_MM) * X_GAIN_MM
    xyc[:, 1] = np.round(xyc[:, 1] / Y_GAIN_MM) * Y_GAIN_MM
    return np.column_stack([np.arange(len(xyc)) * TIME_GAIN_MS, xyc])


def naive_reference_s_per_sample(layers: list[tuple[float, np.ndarray]], subset: int) -> float:
    """Seconds per sample of a naive implementation: a Python loop adding one separable
    Gaussian per sample (beam-on or not) onto the full 400 x 400 plane."""
    xs, ys = PLANE_2CM.centres("x"), PLANE_2CM.centres("y")
    plane = np.zeros((PLANE_2CM.ny, PLANE_2CM.nx))
    per_layer = max(subset // len(layers), 1)
    done = 0
    start = time.perf_counter()
    for energy, samples in layers:
        sigma = float(engine.lateral_sigma_mm(energy, np.array([PLANE_DEPTH_MM]), 2)[0])
        factor = engine.protons_per_count(energy) * float(engine.bortfeld_dose(np.array([2.0]), energy)[0])
        for _, x, y, count in samples[:per_layer]:
            gx = np.exp(-0.5 * ((xs - x) / sigma) ** 2)
            gy = np.exp(-0.5 * ((ys - y) / sigma) ** 2)
            plane += (count * factor / (2 * np.pi * sigma * sigma)) * np.outer(gy, gx)
            done += 1
    return (time.perf_counter() - start) / done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reference-subset", type=int, default=3500, help="samples the naive reference runs on")
    args = parser.parse_args()
    rng = np.random.default_rng(20240601)
    energies = [round(e, 2) for e in np.linspace(160.0, 100.0, LAYERS)]
    with tempfile.TemporaryDirectory(prefix="engine_2cm_") as tmp:
        root = Path(tmp)
        (root / "plan").mkdir()
        write_plan(root / "plan" / "RP_bench.dcm", energies)
        csv_dir = root / "log" / "BENCH_1"
        layers = []
        per_layer = SAMPLES // LAYERS
        for i, energy in enumerate(energies):
            samples = synthetic_layer(rng, per_layer, radius_mm=60.0 - 0.6 * i)
            layers.append((energy, samples))
            data = moqui_csv.encode_values(
                samples[:, 0], samples[:, 1], samples[:, 2], samples[:, 3].astype(np.int64), "rows"
            )
            files.write_atomic(csv_dir / moqui_csv.layer_file_name(i + 1, energy), data)
        n_samples = sum(len(s) for _, s in layers)
        csv_bytes = sum(p.stat().st_size for p in csv_dir.iterdir())
        log_dir = root / "beamlog"
        moqui_parameters.prepare_beam_logdir(csv_dir, 1, log_dir, "index")
        parameters = root / "moqui_tps_BENCH_1.in"
        text = moqui_parameters.render_parameter_file(
            {"GPUID": 0, "UsingPhantomGeo": True, "TwoCentimeterMode": True, "Scorer": "Dose", "OutputFormat": "raw"},
            {
                "BeamNumbers": 1,
                "GantryNum": 2,
                "DicomDir": root / "plan",
                "logFilePath": log_dir,
                "OutputDir": root / "out",
            },
        )
        parameters.write_text(text)

        print("benchmark: built-in engine, TwoCentimeterMode, one synthetic clinical-size beam")
        print(
            f"input: {n_samples} samples in {LAYERS} layers ({energies[-1]:g}-{energies[0]:g} MeV), rows layout, {csv_bytes / 1e6:.1f} MB of CSV"
        )
        env = {"PYTHONPATH": str(REPO / "scripts"), "PATH": "/usr/bin:/bin"}
        walls = []
        for _ in range(args.runs):
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "mqi_communicator.simulate.engine", str(parameters)],
                capture_output=True,
                text=True,
                env=env,
            )
            walls.append(time.perf_counter() - start)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr)
                print(f"engine failed with exit code {proc.returncode}")
                return 1
        engine_lines = [line for line in proc.stdout.splitlines() if line.startswith(("Time taken", "Total execution"))]
        median = statistics.median(walls)

        # Where the time goes, measured in this process (imports already done).
        start = time.perf_counter()
        for path in sorted(csv_dir.iterdir()):
            moqui_csv.read_layer_fast(path)
        parse_fast = time.perf_counter() - start
        start = time.perf_counter()
        for path in sorted(csv_dir.iterdir()):
            moqui_csv.read_layer(path)
        parse_plain = time.perf_counter() - start
        start = time.perf_counter()
        engine.compute_dose([engine.Layer(e, s) for e, s in layers], 2, PLANE_2CM, np.array([PLANE_DEPTH_MM]))
        compute = time.perf_counter() - start

        per_sample = naive_reference_s_per_sample(layers, args.reference_subset)
        reference_total = per_sample * n_samples

        print(f"engine runs: {args.runs} (subprocess wall time, includes interpreter start and imports)")
        print(f"wall times s: {' '.join(f'{w:.3f}' for w in walls)}")
        print(f"median wall time s: {median:.3f}")
        print(f"samples per second: {n_samples / median:.0f}")
        print(f"target s: {TARGET_S:.1f} -> {'met' if median < TARGET_S else 'NOT met'}")
        print(f"engine log (last run): {'; '.join(engine_lines)}")
        print(f"in-process CSV parsing s: read_layer_fast {parse_fast:.3f}, read_layer {parse_plain:.3f}")
        print(f"in-process dose computation s: {compute:.3f}")
        print(
            "reference: naive per-sample implementation (Python loop adding one 400x400 Gaussian per sample),"
            f" evaluated on {args.reference_subset} samples and scaled per sample to all {n_samples}"
        )
        print(f"reference s per sample: {per_sample * 1e6:.1f} us")
        print(f"reference estimated total s: {reference_total:.1f}")
        print(f"speed-up of the engine over the reference (median wall): {reference_total / median:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(recorded("engine_2cm", main))

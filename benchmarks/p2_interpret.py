"""P2 benchmark: a clinical-size case (3 treatment beams, ~100 layers, ~2.5 M log samples).

    .venv/bin/python benchmarks/p2_interpret.py [--repeats 5]

Prints the median wall time of the P2 CLI (as the rule runs it, pinned to one core when
`taskset` exists), samples/s, the 3 s target, and the ratio to a reference measured in the same
run: a naive per-row writer (one Python format call per sample, like the tool it replaces),
timed on a subset of the same layers and scaled per sample.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the synthetic case generator lives in tests/

from mqi_communicator import settings  # noqa: E402
from mqi_communicator.formats import ptn  # noqa: E402
from mqi_communicator.intake.case import build_manifest  # noqa: E402
from tests import casegen  # noqa: E402

TARGET_S = 3.0


def clinical_case(root: Path) -> Path:
    spots = [casegen.grid_spots(70.0 - 0.4 * k, 10.0) for k in range(34)]
    spec = casegen.CaseSpec(
        patient_id="BENCH",
        room="G2",
        beams=[
            casegen.BeamSpec(1, "SETUP", [], [], setup=True),
            casegen.BeamSpec(2, "1G180:TX", [170.0 - 2 * k for k in range(34)], spots, spot_mu=0.05),
            casegen.BeamSpec(3, "2G90", [165.0 - 2 * k for k in range(33)], spots[:33], spot_mu=0.05),
            casegen.BeamSpec(4, "3G270", [160.0 - 2 * k for k in range(33)], spots[:33], spot_mu=0.05),
        ],
    )
    # ~190 spots per layer x 130 samples + beam-off samples ~ 25 k samples per layer.
    return casegen.write_case(root, "bench", spec, samples_per_spot=130, off_samples=1500)


def naive_rows(log: np.ndarray, cal: ptn.RoomCalibration, factor: float) -> bytes:
    lines = []
    for i, row in enumerate(log):
        t = np.float32(i * cal.timegain_ms)
        x = np.float32((int(row[0]) - cal.x_offset) * cal.x_gain_mm * cal.x_sign)
        y = np.float32((int(row[1]) - cal.y_offset) * cal.y_gain_mm)
        lines.append(f"{t!s},{x!s},{y!s},{round(int(row[4]) * factor)}\r\n")
    return "".join(lines).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        case = clinical_case(root / "scan")
        config = settings.load(str(REPO / "config" / "config.yaml"))
        manifest = build_manifest(case, config)
        samples = sum(entry["rows"] for d in manifest["deliveries"] for entry in d["ptn"])
        layers = sum(len(d["ptn"]) for d in manifest["deliveries"])
        print(
            f"case: {len(manifest['deliveries'])} beams, {layers} layers, {samples} samples (generated in {time.perf_counter() - started:.1f} s)"
        )
        manifest_path = root / "intake.json"
        manifest_path.write_text(json.dumps(manifest))
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
        command = [*pin, sys.executable, "-m", "mqi_communicator.interpret", "--logdir", str(case)]
        command += ["--manifest", str(manifest_path), "--settings", str(REPO / "config" / "config.yaml")]
        times = []
        for repeat in range(args.repeats):
            out = root / f"out{repeat}"
            t0 = time.perf_counter()
            subprocess.run([*command, "--outputdir", str(out)], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
            shutil.rmtree(out)
        median = statistics.median(times)

        # Reference: the naive per-row writer on the first layers (~150 k samples), scaled per sample.
        cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
        delivery = manifest["deliveries"][0]
        ref_samples = 0
        t0 = time.perf_counter()
        for entry in delivery["ptn"][:6]:
            log = ptn.read_ptn(case / delivery["folder"] / entry["file"])
            naive_rows(log, cal, 1.0)
            ref_samples += len(log)
        naive_per_sample = (time.perf_counter() - t0) / ref_samples
        naive_total = naive_per_sample * samples

    print(f"runs (s): {', '.join(f'{t:.2f}' for t in times)}{' (pinned to core 0)' if pin else ''}")
    print(f"P2 wall time, median of {args.repeats}: {median:.2f} s")
    print(f"throughput: {samples / median / 1e6:.2f} M samples/s")
    print(
        f"target: < {TARGET_S:.1f} s -> {'MET' if median < TARGET_S else 'MISSED'} ({median / TARGET_S:.2f} of target)"
    )
    print(f"reference (naive per-row writer, {ref_samples} samples, scaled): {naive_total:.1f} s for the case")
    print(f"speed-up vs reference: {naive_total / median:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

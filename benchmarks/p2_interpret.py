"""P2 benchmark: P2's whole process against the clinic's mqi_interpreter on a clinical-size case.

    .venv/bin/python benchmarks/p2_interpret.py --mqi-interpreter PEER_CHECKOUT \\
        [--peer-python PEER_VENV/bin/python] [--repeats 5] [--busy]

The case is the one of issue 24: 3 treatment beams of 36 layers (108 layer logs) and ~2.57 M log
samples, a setup beam, room G2, monitor range codes 2 and 3. Both programs run as whole processes
(start-up included), ours as its rule runs it (`--manifest`, inline `--settings`), theirs as its
README says (`main_cli.py --logdir --outputdir`); they alternate, `--repeats` times each, and the
medians are compared. `--busy` measures a second time while another process keeps a core busy (a
Python busy loop). Nothing is pinned: a rule's job is not.

"Same output" is checked on the last run of each: the same layer file names, in every file the
same number of samples and the same counts, and time, x and y within 2 float32 steps of the
peer's (ours is the exact value rounded once to float32, the peer multiplies in float32; x is in
the plan's frame, mirrored on G2; docs/p2-speed.md).

The peer is a checkout given by path (e.g. `git clone` of a fetched snapshot), never part of this
repository; its commit is recorded. Without `--mqi-interpreter` the comparison is skipped and the
reference is a naive per-row writer of our own, timed on a subset of the layers and scaled.

Each run appends its figures to benchmarks/results/p2_interpret.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the synthetic case generator lives in tests/

from results_log import append_result  # noqa: E402

from mqi_communicator import settings  # noqa: E402
from mqi_communicator.formats import moqui_csv, ptn  # noqa: E402
from mqi_communicator.intake.case import build_manifest  # noqa: E402
from tests import casegen  # noqa: E402

TARGET_RATIO = 10.0
LAYERS_PER_BEAM = 36
# The config sections the interpret rule passes as inline JSON (rules/interpret.smk).
RULE_SECTIONS = ("executables", "interpreter", "monitor_range_factors", "rooms")


def clinical_case(root: Path) -> Path:
    """3 treatment beams x 36 layers, ~190 spots a layer x 129 samples + 1,500 beam-off samples."""
    spots = [casegen.grid_spots(70.0 - 0.4 * k, 10.0) for k in range(LAYERS_PER_BEAM)]
    spec = casegen.CaseSpec(
        patient_id="BENCH",
        room="G2",
        beams=[
            casegen.BeamSpec(1, "SETUP", [], [], setup=True),
            casegen.BeamSpec(2, "1G180:TX", [170.0 - 2 * k for k in range(LAYERS_PER_BEAM)], spots, spot_mu=0.05),
            casegen.BeamSpec(3, "2G90", [165.0 - 2 * k for k in range(LAYERS_PER_BEAM)], spots, spot_mu=0.05),
            casegen.BeamSpec(4, "3G270", [160.0 - 2 * k for k in range(LAYERS_PER_BEAM)], spots, spot_mu=0.05),
        ],
    )
    codes = [2, 3] * (LAYERS_PER_BEAM // 2)
    case = casegen.write_case(root, "bench", spec, samples_per_spot=126, off_samples=1500, range_codes=codes)
    readable_by_the_peer(case)
    return case


def readable_by_the_peer(case: Path) -> None:
    """The delivery text files as the peer reads them too: it requires TCSC_FIELD_NUMBER in
    PlanInfo.txt and takes DOSE1_RANGE from the 6th column of PlanRange.txt (its
    config_loader), where we read columns by header name."""
    for folder in sorted(p for p in case.iterdir() if p.is_dir()):
        info = folder / "PlanInfo.txt"
        beam = next(line.split(",")[1] for line in info.read_text().splitlines() if line.startswith("DICOM_BEAM_"))
        info.write_text(info.read_text() + f"TCSC_FIELD_NUMBER,{beam}\n")
        planrange = folder / "PlanRange.txt"
        rows = [line.split(",") for line in planrange.read_text().splitlines()[1:]]
        lines = ["LAYER_NUMBER,ENERGY,SPARE_3,SPARE_4,SPARE_5,DOSE1_RANGE,DOSE2_RANGE"]
        lines += [f"{layer},{energy},0,0,0,{dose1},{dose2}" for layer, energy, dose1, dose2 in rows]
        planrange.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def busy_core(busy: bool) -> Iterator[None]:
    """While `busy`: another process keeps one core busy (a Python busy loop)."""
    if not busy:
        yield
        return
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        loop.kill()
        loop.wait()


def timed_run(command: list[str], out: Path, *extra: str) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the process and its children) of one whole run."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([*command, "--outputdir", str(out), *extra], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(
            f"{command[0]} ... failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def compare_outputs(ours: Path, theirs: Path, x_sign: float) -> dict[str, Any]:
    """Layer files, samples and values of our P2 output against the peer's (see the module doc)."""
    names = sorted(p.relative_to(ours / "log").as_posix() for p in (ours / "log").rglob("*.csv"))
    peer_names = sorted(p.relative_to(theirs / "log").as_posix() for p in (theirs / "log").rglob("*.csv"))
    if names != peer_names:
        return {
            "same_files": False,
            "ours_only": sorted(set(names) - set(peer_names))[:5],
            "peer_only": sorted(set(peer_names) - set(names))[:5],
        }
    samples = differing = 0
    steps = np.zeros(3)
    counts_equal = same_samples = True
    for name in names:
        mine = moqui_csv.read_layer_fast(ours / "log" / name)
        peer = moqui_csv.read_layer_fast(theirs / "log" / name)
        if mine.shape != peer.shape:
            same_samples = False
            continue
        peer[:, 1] *= x_sign  # the plan's frame (docs/log-plan-frame.md)
        step = np.spacing(np.abs(peer[:, :3]).astype(np.float32)).astype(np.float64)
        off = np.abs(mine[:, :3] - peer[:, :3]) / step
        steps = np.maximum(steps, off.max(axis=0))
        differing += int(np.count_nonzero(off))
        counts_equal = counts_equal and bool(np.array_equal(mine[:, 3], peer[:, 3]))
        samples += len(mine)
    return {
        "same_files": True,
        "layer_files": len(names),
        "same_samples": same_samples,
        "samples": samples,
        "counts_equal": counts_equal,
        "values_differing": differing,
        "max_float32_steps_time_x_y": [round(float(s), 2) for s in steps],
        "same_output": same_samples and counts_equal and bool(steps.max() <= 2.0),
    }


def naive_reference_s(case: Path, manifest: dict[str, Any], config: dict[str, Any], samples: int) -> float:
    """A naive per-row writer (one Python format call per sample), on the first layers, scaled."""
    cal = ptn.RoomCalibration.from_config(config["rooms"]["G2"])
    delivery = manifest["deliveries"][0]
    measured = 0
    started = time.perf_counter()
    for entry in delivery["ptn"][:6]:
        log = ptn.read_ptn(case / delivery["folder"] / entry["file"])
        lines = []
        for i, row in enumerate(log):
            t = np.float32(i * cal.timegain_ms)
            x = np.float32((int(row[0]) - cal.x_offset) * cal.x_gain_mm * cal.x_sign)
            y = np.float32((int(row[1]) - cal.y_offset) * cal.y_gain_mm)
            lines.append(f"{t!s},{x!s},{y!s},{int(row[4])}\r\n")
        "".join(lines).encode()
        measured += len(log)
    return (time.perf_counter() - started) / measured * samples


def peer_commit(peer: Path) -> str:
    result = subprocess.run(["git", "-C", str(peer), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown (not a git checkout)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each program per condition (medians)")
    parser.add_argument("--busy", action="store_true", help="also measure while another process keeps a core busy")
    parser.add_argument("--mqi-interpreter", type=Path, help="a checkout of the clinic's mqi_interpreter (main_cli.py)")
    parser.add_argument(
        "--peer-python", default=sys.executable, help="Python with the peer's requirements (default: this one)"
    )
    args = parser.parse_args()
    peer = args.mqi_interpreter.resolve() if args.mqi_interpreter else None
    if peer is not None and not (peer / "main_cli.py").is_file():
        parser.error(f"{peer}: no main_cli.py (not an mqi_interpreter checkout)")
    config = settings.load(str(REPO / "config" / "config.yaml"))
    x_sign = float(config["rooms"]["G2"].get("x_sign", 1))
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        case = clinical_case(root / "scan")
        manifest = build_manifest(case, config)
        samples = sum(entry["rows"] for d in manifest["deliveries"] for entry in d["ptn"])
        layers = sum(len(d["ptn"]) for d in manifest["deliveries"])
        print(
            f"case: {len(manifest['deliveries'])} beams, {layers} layers, {samples:,} samples "
            f"(generated in {time.perf_counter() - started:.1f} s)"
        )
        (root / "intake.json").write_text(json.dumps(manifest))
        rule_settings = json.dumps({name: config[name] for name in RULE_SECTIONS}, sort_keys=True)
        ours = [sys.executable, "-m", "mqi_communicator.interpret", "--logdir", str(case)]
        ours += ["--manifest", str(root / "intake.json"), "--settings", rule_settings]
        theirs = [args.peer_python, str(peer / "main_cli.py"), "--logdir", str(case)] if peer else None
        if peer is None:
            print("no --mqi-interpreter given: the comparison with the clinic's converter is skipped")
        else:
            print(f"peer: {peer} at {peer_commit(peer)}, run with {args.peer_python}")
        print(f"load average {os.getloadavg()[0]:.2f} at the start")
        for condition in ["idle", "busy"] if args.busy else ["idle"]:
            runs: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
            with busy_core(condition == "busy"):
                for _ in range(args.repeats):  # alternately, so that both see the same load
                    summary = root / "ours" / "p2_summary.json"  # as the rule asks for it
                    runs["ours"].append(timed_run(ours, root / "ours", "--summary", str(summary)))
                    if theirs:
                        runs["peer"].append(timed_run(theirs, root / "peer"))
            result: dict[str, Any] = {"samples": samples, "layers": layers, "repeats": args.repeats}
            for who, measured in runs.items():
                if measured:
                    result[f"{who}_wall_s"] = [round(w, 3) for w, _ in measured]
                    result[f"{who}_median_wall_s"] = round(statistics.median(w for w, _ in measured), 3)
                    result[f"{who}_median_cpu_s"] = round(statistics.median(c for _, c in measured), 3)
            print(f"\n{condition}{' (another process keeps a core busy)' if condition == 'busy' else ''}:")
            print(
                f"  ours (P2 CLI):        runs {result['ours_wall_s']} s, median {result['ours_median_wall_s']:.2f} s wall, {result['ours_median_cpu_s']:.2f} s CPU"
            )
            if theirs:
                result["peer_commit"] = peer_commit(peer) if peer else None
                ratio = result["peer_median_wall_s"] / result["ours_median_wall_s"]
                result["ratio"] = round(ratio, 1)
                result["cpu_ratio"] = round(result["peer_median_cpu_s"] / result["ours_median_cpu_s"], 1)
                print(
                    f"  mqi_interpreter:      runs {result['peer_wall_s']} s, median {result['peer_median_wall_s']:.2f} s wall, {result['peer_median_cpu_s']:.2f} s CPU"
                )
                print(
                    f"  ratio (peer / ours):  {ratio:.1f}x wall, {result['cpu_ratio']:.1f}x CPU; target >= {TARGET_RATIO:g}x -> {'MET' if ratio >= TARGET_RATIO else 'MISSED'}"
                )
                same = compare_outputs(root / "ours", root / "peer", x_sign)
                result["comparison"] = same
                print(f"  same output: {same}")
            else:
                naive = naive_reference_s(case, manifest, config, samples)
                result["naive_reference_s"] = round(naive, 2)
                result["ratio_vs_naive"] = round(naive / result["ours_median_wall_s"], 1)
                print(f"  reference (naive per-row writer, scaled): {naive:.1f} s -> {result['ratio_vs_naive']:.1f}x")
            figures[condition] = result
    figures["ratio"] = {condition: result.get("ratio") for condition, result in figures.items()}
    path = append_result("p2_interpret", figures, busy=None if args.busy else False)
    print(f"\nfigures appended to {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

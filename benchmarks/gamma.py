"""Benchmark: gamma of a 400 x 400, 1 mm plane (3%/2 mm and 2%/2 mm) against pymedphys.gamma.

Run: `.venv/bin/python benchmarks/gamma.py` (from the repository root; pymedphys comes with
`envs/setup.sh --dev`). Planes: a TPS-like 10 x 10 cm field (penumbra, low-dose halo) as the
reference; evaluated doses: a near-passing Monte Carlo-like plane (2 % noise, 0.5 mm shift), a
borderline one (2 % noise, 1.5 mm shift, 2 % high: points in the penumbra search far) and a
grossly failing one (8 mm shift, 20 % high). Both implementations run in this process, pinned
to one core, with the same settings (10 % cutoff, max_gamma 2, pymedphys' scipy interpolation:
numba is not installed); figures are medians of warm repeats, the two measured alternately. `--busy` also measures while a
second process keeps another core busy. Goals: <= 100 ms per plane and >= 15x pymedphys (the
near-passing and borderline planes), a grossly failing plane <= 1 s; pass rates must be equal to 0.1 % (they are printed side by side).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from mqi_communicator.qa.gamma import Criteria, gamma_2d  # noqa: E402

TARGET_S = 0.100
GROSS_TARGET_S = 1.0
TARGET_RATIO = 15.0


def planes() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    axis = np.arange(400) - 199.5
    x, z = np.meshgrid(axis, axis, indexing="ij")

    def field(shift_mm: float) -> np.ndarray:
        edge = 50.0
        sigma = 3.0
        inside = (1 / (1 + np.exp(-(edge - np.abs(x - shift_mm)) / sigma))) * (
            1 / (1 + np.exp(-(edge - np.abs(z)) / sigma))
        )
        halo = 0.08 * np.exp(-(x**2 + z**2) / (2 * 70.0**2))
        return 2.0 * (inside * (1 + 0.05 * x / edge) + halo)

    rng = np.random.default_rng(7)
    reference = field(0.0)
    near = np.clip(field(0.5) * (1 + rng.normal(0, 0.02, reference.shape)), 0, None)
    borderline = np.clip(field(1.5) * 1.02 * (1 + rng.normal(0, 0.02, reference.shape)), 0, None)
    gross = field(8.0) * 1.2
    return reference, {"near-passing": near, "borderline": borderline, "gross failure": gross}


def side_by_side(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median warm times (s) of both, measured alternately (three of ours per one of theirs), so
    that both see the same moments of a shared, noisy machine."""
    ours(), theirs()  # warm
    ours_times, their_times = [], []
    for _ in range(repeats):
        for _ in range(3):
            start = time.perf_counter()
            ours()
            ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs()
        their_times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(their_times)


def pass_rate(gamma: np.ndarray) -> float:
    valid = gamma[np.isfinite(gamma)]
    return 100.0 * float(np.sum(valid <= 1)) / valid.size


def run(repeats: int) -> bool:
    import pymedphys

    axis = np.arange(400) - 199.5
    axes = (axis, axis)
    reference, evaluated = planes()
    ok = True
    for name, plane in evaluated.items():
        for dd in (3.0, 2.0):
            criteria = Criteria(dose_percent=dd, distance_mm=2.0, cutoff_percent=10.0, max_gamma=2.0)
            ours = gamma_2d(axes, reference, axes, plane, criteria)

            def oracle(plane: np.ndarray = plane, dd: float = dd) -> np.ndarray:
                return pymedphys.gamma(
                    axes,
                    reference,
                    axes,
                    plane,
                    dd,
                    2.0,
                    lower_percent_dose_cutoff=10,
                    max_gamma=2.0,
                    interp_algo="scipy",
                )

            theirs = oracle()
            t_ours, t_ref = side_by_side(
                lambda plane=plane, criteria=criteria: gamma_2d(axes, reference, axes, plane, criteria), oracle, repeats
            )
            flips = int(np.sum((ours.gamma <= 1) != (theirs <= 1)))
            target = GROSS_TARGET_S if name == "gross failure" else TARGET_S
            ratio = t_ref / t_ours
            good = t_ours <= target and flips == 0 and abs(ours.pass_rate - pass_rate(theirs)) <= 0.1
            good = good and (name == "gross failure" or ratio >= TARGET_RATIO)
            ok = ok and good
            print(
                f"{name:15s} {criteria.label:18s} ours {t_ours * 1000:7.1f} ms  pymedphys {t_ref * 1000:7.1f} ms"
                f"  x{ratio:5.1f}  pass {ours.pass_rate:6.2f}% vs {pass_rate(theirs):6.2f}%  flips {flips}"
                f"  ({ours.evaluated} points)  {'ok' if good else 'MISSED'}"
            )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="warm pymedphys runs per measurement (median; ours: 3x)")
    parser.add_argument("--busy", action="store_true", help="also measure with another core kept busy")
    args = parser.parse_args()
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else set()
    if cpus:
        os.sched_setaffinity(0, {min(cpus)})
    print(f"one core (pinned to cpu {sorted(os.sched_getaffinity(0))})")
    ok = run(args.repeats)
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        others = cpus - {min(cpus)}
        if others:  # another core, as the goal says (on ours it would measure time slicing, not load)
            os.sched_setaffinity(busy.pid, others)
        try:
            print(f"with another process keeping a core busy (cpu {sorted(others) or 'any'})")
            ok = run(args.repeats) and ok
        finally:
            busy.kill()
            busy.wait()
    print("all goals met" if ok else "some goals MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

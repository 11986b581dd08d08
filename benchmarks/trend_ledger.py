"""Cost of the QA trend step (`python -m mqi_communicator.qa.trend`, as rule qa_trend runs it)
against the number of finished cases in its ledger: one new case is added to a ledger of N
finished cases (two assessed beams each, in two strata) and the trend is drawn; the finished
cases' qa.json files do not exist, so any read of them would fail the run.

    .venv/bin/python benchmarks/trend_ledger.py [--finished 10 1000 10000] [--repeats 3]

Prints the median wall time per N and its ratio to the smallest N measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts")]

from results_log import recorded  # noqa: E402  (benchmarks/, beside this file)

from mqi_communicator.qa import trend_points  # noqa: E402


def case(case_id: str, k: int, relative: bool) -> tuple[dict, dict]:
    """A qa.json and intake.json pair: two beams delivered on day k (minutes apart)."""
    stamp = f"2025{1 + k // 28 % 12:02d}{1 + k % 28:02d}{k % 24:02d}{k % 60:02d}0000"
    gamma = {"criteria": "3%/2mm global", "cutoff_percent": 10.0}
    beams = [
        {
            "number": n,
            "name": f"B{n}",
            "dose": {
                "gamma_primary": gamma | {"pass_rate_percent": 99.0 + (k % 7) / 10 - n / 10},
                "comparison": "relative" if relative else "absolute",
            },
            "delivery": {"verdict": "PASS"},
        }
        for n in (1, 2)
    ]
    qa = {"case_id": case_id, "room": "G2", "beams": beams, "provenance": {"written": "2026-12-01T10:00:00+00:00"}}
    qa["provenance"]["engine"] = "MOQUI"
    folders = [f"{stamp[:-2]}{n:02d}" for n in (1, 2)]
    manifest = {
        "case_id": case_id,
        "mode": "logs",
        "deliveries": [{"folder": f, "irradiation_time": f} for f in folders],
        "beams": [{"number": n, "simulated_deliveries": [f]} for n, f in zip((1, 2), folders, strict=True)],
    }
    return qa, manifest


def measure(finished: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            ledger = root / "results" / "qa_history.jsonl"
            ledger.parent.mkdir()
            lines = []
            for k in range(finished):
                lines.extend(trend_points.beam_points(*case(f"old{k:05d}", k, relative=k % 2 == 1)))
            ledger.write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in lines))
            qa, manifest = case("new", finished + 1, relative=False)
            qa_path = root / "cases" / "new" / "intermediate" / "qa" / "qa.json"
            qa_path.parent.mkdir(parents=True)
            qa_path.write_text(json.dumps(qa))
            (qa_path.parent.parent / "intake.json").write_text(json.dumps(manifest))
            command = [
                sys.executable, "-m", "mqi_communicator.qa.trend", "--qa", str(qa_path), "--ledger", str(ledger),
                "--history", str(root / "cases" / "*" / "intermediate" / "qa" / "qa.json"),
                "--figure", str(root / "t.png"), "--json", str(root / "t.json"),
            ]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO)
            times.append(time.perf_counter() - start)
            assert len(ledger.read_text().splitlines()) == 2 * finished + 2
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = None
    for n in args.finished:
        median = measure(n, args.repeats)
        base = base or median
        print(f"{n:>6} finished cases ({2 * n} ledger lines): {median:.2f} s (x{median / base:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(recorded("trend_ledger", main))

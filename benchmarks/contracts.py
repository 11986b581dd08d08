"""Cost of the case-file contracts (docs/contracts.md) per file of a finished run.

    .venv/bin/python benchmarks/contracts.py WORKDIR

WORKDIR: the working folder of a finished run (its data/cases/*/intermediate/). Prints, per
intake.json, qa/qa.json and case_summary.json, the CPU time (best of 5) of the full check (where
the file is written), of a read with its cheap check (where it is read) and of json.loads alone;
then the CPU time of importing mqi_communicator.formats.contracts in a fresh interpreter. The
figures are appended to benchmarks/results/contracts.jsonl (results_log.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from results_log import append_result  # noqa: E402

from mqi_communicator.formats import contracts  # noqa: E402

FILES = {"intake": "intake.json", "qa": "qa/qa.json", "case_summary": "case_summary.json"}
IMPORT = (
    "import json, pathlib, typing, functools, time; import mqi_communicator.files; t = time.process_time(); "
    "import mqi_communicator.formats.contracts; print((time.process_time() - t) * 1e3)"
)


def best_ms(call: Callable[[], object], number: int) -> float:
    times = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(number):
            call()
        times.append((time.process_time() - start) / number)
    return min(times) * 1e3


def main() -> None:
    work = Path(sys.argv[1])
    figures: dict[str, float] = {}
    for contract, name in FILES.items():
        for path in sorted((work / "data" / "cases").glob(f"*/intermediate/{name}")):
            data = json.loads(path.read_text())
            full = best_ms(lambda: contracts.validate(contract, data, path), 20)  # noqa: B023
            read = best_ms(lambda: contracts.read(contract, path), 200)  # noqa: B023
            plain = best_ms(lambda: json.loads(path.read_text()), 200)  # noqa: B023
            case = path.relative_to(work / "data" / "cases").parts[0]
            figures |= {f"{case}/{name} {k}_ms": round(v, 3) for k, v in [("full", full), ("read", read)]}
            print(f"{name:18} {case:24} full {full:.2f} ms  read+check {read:.3f} ms  json.loads {plain:.3f} ms")
    env = {"PYTHONPATH": str(REPO / "scripts")}
    runs = [
        float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, env=env).stdout)
        for _ in range(7)
    ]
    print(f"import formats.contracts: {min(runs):.1f} ms CPU (best of 7)")
    figures["import_ms"] = round(min(runs), 2)
    print(f"appended to {append_result('contracts', figures, busy=False, note='CPU time, best of 5')}")


if __name__ == "__main__":
    main()

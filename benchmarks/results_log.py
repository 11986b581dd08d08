"""Each benchmark run's figures, appended as one JSON line to `benchmarks/results/<name>.jsonl`.

A line says when (UTC), on which commit (and whether the tree had changes), under which load,
on which machine, and the figures; docs/performance.md quotes the latest line of each file and
the history stays in the file, not in the docs.

    from results_log import append_result
    append_result("gamma", {"near_passing_ms": 2.0, ...}, busy=False)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    repo = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def append_result(benchmark: str, figures: dict[str, Any], *, busy: bool, note: str = "") -> Path:
    """Append one run's figures; returns the file written."""
    line = {
        "benchmark": benchmark,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
        "machine": platform.node(),
        "busy_core": busy,
        "figures": figures,
    }
    if note:
        line["note"] = note
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{benchmark}.jsonl"
    with path.open("a") as out:
        out.write(json.dumps(line, sort_keys=True) + "\n")
    return path

"""Each benchmark run's figures, appended as one JSON line to `benchmarks/results/<name>.jsonl`.

A line says when (UTC), on which commit (and whether the tree had changes), under which load,
on which machine, and the figures; docs/performance.md quotes the latest line of each file and
the history stays in the file, not in the docs.

    from results_log import append_result
    append_result("gamma", {"near_passing_ms": 2.0, ...}, busy=False)

The benchmarks call it at the end of every run; commit the lines a docs figure quotes.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    repo = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def append_result(benchmark: str, figures: dict[str, Any], *, busy: bool | None = None, note: str = "") -> Path:
    """Append one run's figures; returns the file written. `busy`: whether another process kept a
    core busy throughout; None when the figures hold both (keys say which is which)."""
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


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, real: TextIO) -> None:
        self.real, self.copy = real, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()


def recorded(benchmark: str, main: Callable[[], int | None]) -> int:
    """Run a benchmark's `main` and append what it printed (its figures table) with its exit
    status and arguments: `sys.exit(recorded("gamma", main))`."""
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        status = main() or 0
    finally:
        sys.stdout = tee.real
    lines = [line for line in tee.copy.getvalue().splitlines() if line.strip()]
    append_result(benchmark, {"exit_status": status, "args": sys.argv[1:], "output": lines})
    return status

"""What the overview page (`bin/mqi overview`, docs/overview-page.md) costs with 10,000 finished cases.

    .venv/bin/python benchmarks/overview.py [--cases 10000] [--runs 5] [--keep DIR]

One case's QA is computed by the qa rule's own command (tests/qa_results) and signed by
`bin/mqi sign`; the site then gets N finished cases made of that result: each its own
case_summary.json (finish times spread over a year, a verdict) and qa.json (a room of three),
the sheet and PDF hard-linked, one case in ten with the source's sign-off record (a signature
of other results: VOID, so its qa.json is hashed, the dearer path). Printed, median of --runs, idle and with one core busy:

- regeneration, cold (no cache: every case's files read) and warm (the cache; the run end's cost),
  in the process and as `bin/mqi overview` (with Python's start-up); goal <= 2 s;
- the page's first render in headless Chromium from disk: `performance.now()` when the first page
  of rows and the trend are drawn (the page writes it into #render-ms), and the wall time of
  `--dump-dom` against a blank page's; goal <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from results_log import recorded

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
ROOMS = ("G1", "G2", "G3")
CHROMIUM = ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom"]


def build_site(root: Path, count: int) -> tuple[Path, Path]:
    """(workdir, site config) with `count` finished cases made of one computed, signed result."""
    from mqi_communicator.ops import state
    from tests import qa_results, test_qa_verdict
    from tests.qa_results import CASE

    source_root = root / "source"
    case = test_qa_verdict.make_case(source_root)
    qa_results.write_qa(case, source_root / "result")
    workdir, configfile, layout = qa_results.site(root)
    shutil.copytree(case, root / "scan" / CASE)
    shutil.copytree(source_root / "result", layout.processing(CASE))
    sign = [str(REPO / "bin" / "mqi"), "sign", CASE, "--by", "Dr Bench", "--workdir", str(workdir)]
    subprocess.run([*sign, "--configfile", str(configfile)], check=True, capture_output=True)
    source = layout.processing(CASE)
    qa = json.loads((source / "qa" / "qa.json").read_text())
    year = 365 * 86400
    now = time.time()
    for number in range(count - 1):
        case_id = f"case_{number:05d}"
        (root / "scan" / case_id).mkdir()
        processing = layout.processing(case_id)
        (processing / "qa").mkdir(parents=True)
        verdict = "FAIL" if number % 7 == 0 else "PASS"
        (processing / state.SUMMARY).write_text(json.dumps({"case_id": case_id, "qa": {"verdict": verdict}}))
        when = now - year * number / count
        os.utime(processing / state.SUMMARY, (when, when))
        (processing / "qa" / "qa.json").write_text(json.dumps(qa | {"room": ROOMS[number % 3]}))
        for name in ("qa_sheet.html", "qa_report.pdf"):
            os.link(source / "qa" / name, processing / "qa" / name)
        if number % 10 == 0:
            # The real signature of the source's qa.json: these cases show VOID (their qa.json differs).
            shutil.copytree(source / "signoff", processing / "signoff", copy_function=os.link)
    return workdir, configfile


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def regeneration(workdir: Path, configfile: Path, runs: int) -> dict[str, float]:
    from mqi_communicator import settings
    from mqi_communicator.ops import overview, state

    layout = state.Layout.from_config(settings.load_site(str(configfile), workdir), workdir)

    def in_process(cold: bool) -> float:
        if cold:
            (workdir / overview.INDEX).unlink(missing_ok=True)
        start = time.perf_counter()
        overview.write(layout, workdir, overview.DEFAULT_OUTPUT)
        return time.perf_counter() - start

    def command() -> float:
        start = time.perf_counter()
        subprocess.run(
            [str(REPO / "bin" / "mqi"), "overview", "--workdir", str(workdir), "--configfile", str(configfile)],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start

    return {
        "cold, in process": median_of(runs, lambda: in_process(True)),
        "warm, in process": median_of(runs, lambda: in_process(False)),
        "warm, bin/mqi overview": median_of(runs, command),
    }


def first_render(page: Path, runs: int) -> dict[str, float]:
    blank = page.with_name("blank.html")
    blank.write_text("<!DOCTYPE html><html><body></body></html>")

    def dump(url: str) -> tuple[float, str]:
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            start = time.perf_counter()
            command = [*CHROMIUM, f"--user-data-dir={profile}", url]
            out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
            return time.perf_counter() - start, out

    rendered, walls, blanks = [], [], []
    for _ in range(runs):
        wall, dom = dump(page.as_uri())
        found = re.search(r'id="render-ms"[^>]*>([\d.]+)<', dom)
        rows = re.search(r'<tbody id="rows">(.*?)</tbody>', dom, re.S)
        assert found and rows and rows.group(1).count("<tr data-case=") == 100, "the page did not render 100 rows"
        rendered.append(float(found.group(1)) / 1000)
        walls.append(wall)
        blanks.append(dump(blank.as_uri())[0])
    return {
        "performance.now() at first render": statistics.median(rendered),
        "--dump-dom wall time minus a blank page's": statistics.median(walls) - statistics.median(blanks),
    }


def measure(workdir: Path, configfile: Path, runs: int) -> dict[str, float]:
    figures = regeneration(workdir, configfile, runs)
    return figures | first_render(workdir / "results" / "overview" / "index.html", runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the site here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mqi-overview-bench-"))
    try:
        start = time.perf_counter()
        workdir, configfile = build_site(root, args.cases)
        print(f"{args.cases} finished cases built in {time.perf_counter() - start:.0f} s under {root}")
        results = {"idle": measure(workdir, configfile, args.runs)}
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            results["one core busy"] = measure(workdir, configfile, args.runs)
        finally:
            busy.kill()
            busy.wait()
        size = (workdir / "results" / "overview" / "cases.js").stat().st_size
        print(f"cases.js: {size / 1e6:.1f} MB; median of {args.runs} runs (goals: regeneration <= 2 s, render <= 1 s)")
        for load, figures in results.items():
            for name, seconds in figures.items():
                print(f"  {load:14s} {name:45s} {seconds:6.3f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(recorded("overview", main))

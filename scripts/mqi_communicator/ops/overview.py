"""`bin/mqi overview`: one static page of every case (docs/overview-page.md).

    <output>/index.html   the page (written once per regeneration; no network, no server)
    <output>/cases.js     the data it shows: `window.MQI_OVERVIEW = {...}` (a script, not JSON:
                          a page opened from disk may load a script but not fetch() a file)

Every finished case (and every archived one, from the archive's index) with its room, dates,
verdict, labels, sign-off and links, and every case without a result yet with its state and why to its sheet and PDFs, relative to the page so the folder can
be opened from disk or served by any web server; and the per-room QA trend from
`results/qa_trend.json`. The page filters, searches and pages in its own script.

Regenerated at the end of each run (the run recorder) and by the command. Its cost stays flat:
a finished case costs a few `stat`s; what was read from its files is kept in
`.mqi/overview-index.json`, keyed by the files' mtimes and sizes, and read again only when one of
them changes (a new result, a new signature).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import sha256_of, write_atomic, write_json_atomic
from mqi_communicator.ops import archive, state
from mqi_communicator.ops.overview_page import PAGE
from mqi_communicator.qa import signoff_record

INDEX = Path(".mqi") / "overview-index.json"
# Part of every cached entry's key: a change to what is read from a case's files renews them all.
FACTS_VERSION = 2
LINKS = ("sheet", "pdf", "signed_pdf")
DEFAULT_OUTPUT = Path("results") / "overview"
TREND = Path("results") / "qa_trend.json"
QA_JSON = Path("qa") / "qa.json"
SHEET = Path("qa") / "qa_sheet.html"
PDF = Path("qa") / "qa_report.pdf"
SIGNOFF_RECORD = Path(signoff_record.FOLDER) / signoff_record.RECORD
# The columns of a case in cases.js, in this order (a list per case keeps 10,000 cases small).
COLUMNS = (
    "case",
    "state",
    "room",
    "finished",
    "delivered",
    "verdict",
    "labels",
    "signoff",
    "signoff_summary",
    "sheet",
    "pdf",
    "signed_pdf",
)


def _stat_key(path: str) -> list[int]:
    """What tells a file's change: [mtime_ns, size], [0, -1] when it is not there."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return [0, -1]
    return [found.st_mtime_ns, found.st_size]


def _day(irradiation: Any) -> str:
    """A 16-digit delivery folder name (YYYYMMDDhhmmssxx) as a date, or ""."""
    text = str(irradiation or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 16 and text.isdigit() else ""


def _minute(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else ""


def case_facts(processing: Path, finished_ns: int) -> dict[str, Any]:
    """What the page shows of a finished case, read from its summary, qa.json and sign-off record
    (the files). Links are kept relative to the processing folder: the cache stays right when
    the workdir moves; they are made relative to the page when it is written."""
    summary = state.read_json(processing / state.SUMMARY) or {}
    qa_entry: dict[str, Any] = summary["qa"] if isinstance(summary.get("qa"), dict) else {}
    qa = state.read_json(processing / QA_JSON) or {}
    labels = summary.get("labels") or (["PLAN-BASED"] if summary.get("mode") == "plan" else [])
    assessed = qa_entry.get("fraction_assessed") or qa.get("fraction_assessed") or {}
    facts: dict[str, Any] = {
        "room": str(qa.get("room") or ""),
        "finished": _minute(finished_ns / 1e9),
        "delivered": _day(assessed.get("first_irradiation")),
        "verdict": str(summary.get("verdict") or qa_entry.get("verdict") or qa.get("verdict") or ""),
        "labels": " ".join(str(label) for label in labels),
        "sheet": SHEET.as_posix() if (processing / SHEET).is_file() else "",
        "pdf": PDF.as_posix() if (processing / PDF).is_file() else "",
    }
    return facts | signoff_facts(processing)


def signoff_facts(processing: Path) -> dict[str, str]:
    """The sign-off state and line (docs/sign-off.md) and the newest signed PDF of these results."""
    record = processing / SIGNOFF_RECORD
    if not record.is_file():
        return {"signoff": "unsigned", "signoff_summary": "unsigned", "signed_pdf": ""}
    try:
        judged = signoff_record.evaluate(signoff_record.read_records(record), sha256_of(processing / QA_JSON))
    except (OSError, ValueError) as exc:
        return {"signoff": "void", "signoff_summary": f"sign-off not readable: {exc}", "signed_pdf": ""}
    # `report` names the signed PDF beside the record (ops/signoff.py); the newest is for the chart.
    reports = [record.parent / str(entry["report"]) for entry in judged.valid if entry.get("report")]
    signed = next((report for report in reversed(reports) if report.is_file()), None)
    signed_pdf = f"{signoff_record.FOLDER}/{signed.name}" if signed else ""
    return {"signoff": judged.state, "signoff_summary": judged.summary(), "signed_pdf": signed_pdf}


def _finished_row(processing: str, finished_ns: int, cached: dict[str, Any] | None) -> dict[str, Any]:
    # Strings, not Paths, in what runs per case and run: 10,000 cases' Path objects cost a second.
    key = [
        FACTS_VERSION,
        finished_ns,
        *_stat_key(f"{processing}/{QA_JSON}"),
        *_stat_key(f"{processing}/{SIGNOFF_RECORD}"),
    ]
    if cached and cached.get("key") == key:
        return cached
    return {"key": key, "facts": case_facts(Path(processing), finished_ns)}


def _archived_row(entry: dict[str, Any], processing: Path, workdir: Path, cached: dict[str, Any] | None) -> dict:
    """An archived case: the facts kept from when it was here (or the archive index's), its links
    into the archive (`DEST/<case>/outputs/<processing, relative to the workdir>`: ops.archive)."""
    dest = str(entry.get("dest") or "")
    if cached and cached.get("dest") == dest and cached.get("version") == FACTS_VERSION:
        return cached
    facts = dict((cached or {}).get("facts") or {})
    facts.setdefault("finished", _minute(entry.get("finished")))
    facts["verdict"] = facts.get("verdict") or str(entry.get("verdict") or "").split(";")[0].split(" [")[0]
    try:
        inside = "outputs/" + str(processing.relative_to(workdir))
    except ValueError:
        inside = "outputs/abs/" + str(processing).lstrip("/")
    moved = Path(dest) / inside
    defaults = {"sheet": SHEET.as_posix(), "pdf": PDF.as_posix()}
    for name in LINKS:
        relative = facts.get(name) or defaults.get(name, "")
        facts[name] = relative if relative and (moved / relative).is_file() else ""
    return {"dest": dest, "version": FACTS_VERSION, "base": str(moved), "facts": facts}


def _unfinished_rows(layout: state.Layout, workdir: Path, case_dirs: list[Path]) -> list[tuple]:
    """Cases without a result yet, as `bin/mqi status` sees them (failed, retrying, running,
    queued, waiting): the page lists every case, and a failed one must reach the eye as surely as
    a FAIL. Their state stands where a verdict would, the reason where labels would. Few at a
    time, so read each time rather than cached."""
    if not case_dirs:
        return []
    from mqi_communicator.ops import status  # only when a case has no result: its imports cost the command 0.15 s

    now = time.time()
    this_run = status.running_plan(workdir, status.last_run(workdir))
    rows = []
    for case_dir in case_dirs:
        seen = status.case_status(layout, case_dir, {}, now, this_run)
        facts = dict.fromkeys(("room", "finished", "delivered", "signoff", "signoff_summary", *LINKS), "")
        facts |= {"verdict": seen.state.upper(), "labels": seen.reason or seen.step}
        since = seen.since or now
        rows.append((since, seen.case_id, seen.state, facts | {"base": str(layout.processing(seen.case_id))}))
    return rows


def collect(layout: state.Layout, workdir: Path) -> list[dict[str, Any]]:
    """Every case, newest first, with its facts: finished, changed and archived ones with their
    results, the others with their state (`_unfinished_rows`); links are relative to `base`, its
    folder (the processing folder, or its copy in the archive)."""
    index_path = workdir / INDEX
    loaded = state.read_json(index_path) or {}
    index: dict[str, Any] = {}
    cases = []
    template = layout.processing_template
    unfinished: list[Path] = []
    for entry in state.case_dirs(layout.scan_dir):
        case_id = entry.name
        if not state.CASE_ID_PATTERN.match(case_id):
            continue
        processing = template.replace("{case_id}", case_id)  # layout.processing, as a string
        try:
            finished_ns = os.stat(f"{processing}/{state.SUMMARY}").st_mtime_ns
        except FileNotFoundError:
            unfinished.append(Path(entry.path))
            continue
        row = index[case_id] = _finished_row(processing, finished_ns, loaded.get(case_id))
        status = "changed" if os.path.exists(f"{processing}/{state.CHANGED}") else "finished"
        cases.append((finished_ns / 1e9, case_id, status, row["facts"] | {"base": processing}))
    cases += _unfinished_rows(layout, workdir, unfinished)
    for case_id, moved in archive.read_index(workdir).items():
        if case_id in index:
            continue
        row = index[case_id] = _archived_row(moved, layout.processing(case_id), workdir, loaded.get(case_id))
        cases.append((float(moved.get("finished") or 0), case_id, "archived", row["facts"] | {"base": row["base"]}))
    if index != loaded:
        with contextlib.suppress(OSError):  # only a cache: a read-only workdir still gets a page
            write_json_atomic(index_path, index)
    cases.sort(key=lambda c: (-c[0], c[1]))
    return [{"case": case_id, "state": status, **facts} for _, case_id, status, facts in cases]


def trend_series(trend: dict[str, Any]) -> list[dict[str, Any]]:
    """The QA trend (qa/trend.py's JSON) as the page draws it: one series per stratum, with its
    room, the points' [time, pass rate, out of control] and the process limits."""
    series = []
    for name, stratum in sorted((trend.get("strata") or {}).items()):
        points = stratum.get("points") or []
        rooms = sorted({str(p.get("room") or "") for p in points} - {""})
        series.append(
            {
                "stratum": name,
                "room": rooms[0] if len(rooms) == 1 else "unknown",
                "limits": stratum.get("limits"),
                "note": stratum.get("note") or "",
                "beams_in_history": stratum.get("beams_in_history", len(points)),
                "points": [
                    [str(p.get("time") or ""), p.get("pass_rate_percent"), bool(p.get("out_of_control"))]
                    for p in points
                ],
            }
        )
    return series


def _relative_links(cases: list[dict[str, Any]], output: Path, template: str) -> None:
    """Links relative to the page. A processing folder's is the processing template's, made
    relative once, with the case id put in (a relpath per case costs a second per 10,000)."""
    relative_template = Path(os.path.relpath(template, output)).as_posix()
    for case in cases:
        case_id, base = case["case"], case.pop("base")
        if base == template.replace("{case_id}", case_id):
            folder = relative_template.replace("{case_id}", case_id)
        else:
            folder = Path(os.path.relpath(base, output)).as_posix()
        for name in LINKS:
            if case[name]:
                case[name] = f"{folder}/{case[name]}"


def write(layout: state.Layout, workdir: Path, output: Path) -> Path:
    """Regenerate the page and its data in `output`; returns the page."""
    output = output if output.is_absolute() else workdir / output
    cases = collect(layout, workdir)
    _relative_links(cases, output, layout.processing_template)
    trend_path = workdir / TREND
    try:
        trend = json.loads(trend_path.read_text()) if trend_path.is_file() else {}
    except (OSError, ValueError) as exc:
        print(f"mqi overview: the trend {trend_path} is not readable ({exc}); no trend shown", file=sys.stderr)
        trend = {}
    data = {
        "generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "columns": COLUMNS,
        "cases": [[case.get(column, "") for column in COLUMNS] for case in cases],
        "trend": trend_series(trend),
    }
    script = "window.MQI_OVERVIEW = " + json.dumps(data, separators=(",", ":")) + ";\n"
    # "</" never ends a script from inside a string: case ids and comments come from outside.
    write_atomic(output / "cases.js", script.replace("</", "<\\/").encode())
    page = output / "index.html"
    if not page.is_file() or page.read_text() != PAGE:
        write_atomic(page, PAGE.encode())
    return page


def regenerate_after_run(config: dict[str, Any], workdir: Path) -> None:
    """The run recorder's call at the end of a run: never fails the run, says what went wrong."""
    try:
        write(state.Layout.from_config(config, workdir), workdir, DEFAULT_OUTPUT)
    except Exception as exc:  # a page must never take a run down
        print(f"mqi overview: not regenerated ({type(exc).__name__}: {exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.overview",
        description="Write the overview page of every finished case (`bin/mqi overview`).",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"the page's folder (default: {DEFAULT_OUTPUT})"
    )
    settings.add_site_arguments(parser)
    args = parser.parse_args(argv)
    try:
        workdir, _, layout = state.open_site(args)
        if not layout.scan_dir.is_dir():
            raise ValueError(f"the scan folder {layout.scan_dir} (paths.local.scan_directory) is not a folder")
        page = write(layout, workdir, args.output)
    except (OSError, ValueError) as exc:
        print(f"mqi overview: {exc}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())

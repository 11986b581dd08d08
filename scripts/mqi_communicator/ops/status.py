"""`bin/mqi status`: every case's state, read from the case folders (the files are the truth).

States: waiting (no ready marker yet, or its quiet period), queued (ready; the next run takes it, or
this run does: a case of the running run's plan not started yet),
running (a job of the current run: step, beam, SLURM job, elapsed), failed (step, reason, log;
`retrying` when a transient failure will be tried again), finished (time, QA verdict), changed
(finished, but its input files changed since), archived (moved away by `bin/mqi archive`: read
from its index, with the verdict and where it went). A finished case also shows its sign-off
(docs/sign-off.md): unsigned, signed, rejected, or void (signed for results that are not these).
A finished case costs one or two `stat`s; its
summary is read once and kept in `.mqi/status-index.json`, a cache any run rebuilds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import sha256_of, write_json_atomic
from mqi_communicator.intake.case_inputs import is_ready
from mqi_communicator.intake.fraction_watch import RECORDS, summary_line
from mqi_communicator.ops import archive, disk_guard, recorder, state, status_lines
from mqi_communicator.qa import signoff_record

INDEX = Path(".mqi") / "status-index.json"
ORDER = {
    "running": 0,
    "failed": 1,
    "retrying": 2,
    "changed": 3,
    "queued": 4,
    "waiting": 5,
    "finished": 6,
    "archived": 7,
}
NEXT_RUN_TAKES_IT = "ready; the next run takes it"
THIS_RUN_TAKES_IT = "ready; this run takes it"
# Finished cases and archived ones are listed only with --all (the latest --recent without).
DONE = ("finished", "archived")


@dataclass
class CaseStatus:
    case_id: str
    state: str
    step: str = ""
    beam: str = ""
    slurm_job: str = ""
    since: float | None = None  # running: start; failed: failure time; finished: finish time
    reason: str = ""
    log: str = ""
    verdict: str = ""
    signoff: str = ""  # finished: unsigned, signed, rejected or void
    signoff_summary: str = ""


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another host's run: trust its record
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _summary_facts(path: Path, mtime_ns: int, index: dict[str, Any], case_id: str) -> tuple[float, str]:
    # A fraction record added later changes its folder's mtime (docs/fractions.md).
    try:
        records_ns = (path.parent / RECORDS).stat().st_mtime_ns
    except FileNotFoundError:
        records_ns = 0
    cached = index.get(case_id)
    if cached and cached[0] == mtime_ns and cached[3:] == [records_ns]:
        return float(cached[1]), str(cached[2])
    verdict = state.summary_verdict(state.read_json(path) or {})
    fractions = summary_line(path.parent) if records_ns else ""
    verdict = f"{verdict}; {fractions}" if fractions else verdict
    index[case_id] = [mtime_ns, mtime_ns / 1e9, verdict, records_ns]
    return mtime_ns / 1e9, verdict


def signoff_of(processing: Path) -> tuple[str, str]:
    """(state, one line) of a finished case's sign-off; one `stat` when nobody signed."""
    record = processing / signoff_record.FOLDER / signoff_record.RECORD
    if not record.exists():
        return "unsigned", "unsigned"
    try:
        signoff = signoff_record.evaluate(signoff_record.read_records(record), sha256_of(processing / "qa" / "qa.json"))
    except (OSError, ValueError) as exc:
        return "void", f"sign-off not readable: {exc}"
    return signoff.state, signoff.summary()


def case_status(
    layout: state.Layout, case_dir: Path, index: dict[str, Any], now: float, this_run: frozenset[str] = frozenset()
) -> CaseStatus:
    """`this_run`: the cases the running run's DAG holds (`running_plan`)."""
    case_id = case_dir.name
    processing = layout.processing(case_id)
    try:
        summary_mtime = (processing / state.SUMMARY).stat().st_mtime_ns
    except FileNotFoundError:
        summary_mtime = None
    if summary_mtime is not None:
        finished_at, verdict = _summary_facts(processing / state.SUMMARY, summary_mtime, index, case_id)
        changed = state.read_json(processing / state.CHANGED) if (processing / state.CHANGED).exists() else None
        if changed:
            files = ", ".join(changed.get("files", [])[:3])
            return CaseStatus(case_id, "changed", since=finished_at, reason=f"input changed after finishing: {files}")
        signed, signed_line = signoff_of(processing)
        return CaseStatus(
            case_id, "finished", since=finished_at, verdict=verdict, signoff=signed, signoff_summary=signed_line
        )
    running = (state.read_json(processing / state.RUNNING) or {}).get("jobs", {})
    live = [job for job in running.values() if _alive(int(job.get("pid", 0)), str(job.get("host", "")))]
    if live:
        job = min(live, key=lambda j: j.get("started", now))
        return CaseStatus(
            case_id,
            "running",
            step=", ".join(sorted({j["rule"] for j in live})),
            beam=", ".join(sorted({j["beam"] for j in live if j.get("beam")})),
            slurm_job=", ".join(sorted({str(j["slurm_job"]) for j in live if j.get("slurm_job")})),
            since=float(job.get("started", now)),
            log=(job.get("log") or [""])[0],
        )
    failure = state.Failure.read(processing / state.FAILED)
    if failure is not None:
        again, why = state.retry_decision(layout, case_dir, failure)
        why = f"{why}; this run retries it" if again and case_id in this_run else why
        return CaseStatus(
            case_id,
            "retrying" if again else "failed",
            step=failure.step,
            beam=failure.beam or "",
            since=failure.time,
            reason=f"{state.headline(failure.reason, case_dir)} [{why}]",
            log=failure.log,
        )
    if case_id in this_run:
        # In the running run's DAG: it runs when the jobs before it are done, whatever its folder does now.
        return CaseStatus(case_id, "queued", reason=THIS_RUN_TAKES_IT)
    if not (case_dir / layout.ready_marker).is_file():
        return CaseStatus(case_id, "waiting", reason=f"no {layout.ready_marker} yet")
    if not is_ready(case_dir, layout.ready_marker, layout.ready_quiet_seconds, now):
        return CaseStatus(case_id, "waiting", reason=f"files changed in the last {layout.ready_quiet_seconds:g} s")
    return CaseStatus(case_id, "queued", reason=NEXT_RUN_TAKES_IT)


def running_plan(workdir: Path, run: dict[str, Any]) -> frozenset[str]:
    """The cases of the run now running (the recorder's run_plan.json): none when no run is
    running, or when the run that wrote the plan is dead or is not the one `run` (last_run, read
    first: the recorder writes the plan before it) names."""
    plan = state.read_json(recorder.run_plan_path(workdir)) or {}
    same = (plan.get("pid"), plan.get("host")) == (run.get("pid"), run.get("host"))
    if run.get("status") != "running" or not same:
        return frozenset()
    return frozenset(str(case_id) for case_id in plan.get("cases", []))


def collect(layout: state.Layout, workdir: Path, run: dict[str, Any] | None = None) -> list[CaseStatus]:
    """`run`: the last run as shown beside the cases (read here when not given)."""
    index_path = workdir / INDEX
    loaded = state.read_json(index_path) or {}
    index = dict(loaded)
    now = time.time()
    this_run = running_plan(workdir, last_run(workdir) if run is None else run)
    cases = [
        case_status(layout, Path(entry.path), index, now, this_run)
        for entry in state.case_dirs(layout.scan_dir)
        if state.CASE_ID_PATTERN.match(entry.name)
    ]
    # A case moved away (archived) leaves the cache with it: the index stays the size of the scan
    # folder. Archived cases still count, from the archive's own index (ops.archive).
    present = {c.case_id for c in cases}
    index = {case_id: facts for case_id, facts in index.items() if case_id in present}
    for case_id, entry in archive.read_index(workdir).items():
        if case_id not in present:
            since = entry.get("finished")
            verdict = str(entry.get("verdict") or "")
            cases.append(CaseStatus(case_id, "archived", since=since, verdict=verdict, log=str(entry.get("dest", ""))))
    if index != loaded:
        # A read-only view (another user's workdir) still works: the index is only a cache.
        with contextlib.suppress(OSError):
            write_json_atomic(index_path, index)
    return cases


def hold_back(cases: list[CaseStatus], guard: str) -> None:
    """While the disk guard holds new cases back (`guard`: why), a queued case waits for space."""
    if guard:
        for case in cases:
            if case.state == "queued" and case.reason == NEXT_RUN_TAKES_IT:  # the running run's DAG is set
                case.state, case.reason = "waiting", guard


def last_run(workdir: Path) -> dict[str, Any]:
    record = state.read_json(recorder.last_run_path(workdir)) or {}
    if record.get("status") == "running" and not _alive(int(record.get("pid", 0)), str(record.get("host", ""))):
        record["status"] = "killed"
    return record


def select(
    cases: list[CaseStatus], failed: bool, since: float | None, show_all: bool, recent: int, unsigned: bool = False
) -> list[CaseStatus]:
    if unsigned:  # what waits for a signature: every one of them, the oldest last
        waiting = [c for c in cases if c.state == "finished" and c.signoff in ("unsigned", "void")]
        return sorted(waiting, key=lambda c: (-(c.since or 0), c.case_id))
    chosen = [c for c in cases if c.state in ("failed", "retrying", "changed")] if failed else cases
    if since is not None:
        chosen = [c for c in chosen if (c.since or 0) >= since or c.state in ("running", "queued")]
    if not show_all and not failed:
        finished = sorted((c for c in chosen if c.state in DONE), key=lambda c: c.since or 0)
        hidden = {c.case_id for c in finished[:-recent]} if recent else {c.case_id for c in finished}
        chosen = [c for c in chosen if c.case_id not in hidden]
    return sorted(chosen, key=lambda c: (ORDER.get(c.state, 9), -(c.since or 0), c.case_id))


def render(
    cases: list[CaseStatus],
    shown: list[CaseStatus],
    run: dict[str, Any],
    timer: str,
    guard: str = "",
    network: str | None = None,
) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    styles = {"running": "cyan", "failed": "bold red", "retrying": "yellow", "changed": "bold magenta"}
    styles |= {"finished": "green", "archived": "green", "queued": "blue", "waiting": "dim"}
    table = Table(title="mqi_communicator cases", expand=True)
    slurm = any(c.slurm_job for c in shown)  # a column only where jobs go to SLURM
    for column in ("case", "state", "step / beam", *(["SLURM job"] if slurm else []), "time"):
        table.add_column(column, no_wrap=column != "step / beam")
    table.add_column("reason / verdict", overflow="fold")
    table.add_column("log", no_wrap=True)
    for c in shown:
        when = status_lines.ago(now - c.since) if c.state == "running" and c.since else status_lines.when(c.since)
        step = " / ".join(x for x in (c.step, c.beam) if x)
        # Text(), not markup: reasons hold brackets and paths.
        verdict = "; ".join(x for x in (c.verdict, c.signoff_summary) if x)
        cells = (c.case_id, c.state, step, *([c.slurm_job] if slurm else []), when, c.reason or verdict, c.log)
        table.add_row(*(Text(cell, style=styles.get(c.state, "") if i == 1 else "") for i, cell in enumerate(cells)))
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.state] = counts.get(c.state, 0) + 1
    totals = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: ORDER.get(kv[0], 9))) or "no cases"
    hidden = len(cases) - len(shown)
    lines = [f"{len(cases)} cases: {totals}" + (f" ({hidden} not shown; --all shows every case)" if hidden else "")]
    if run:
        ended = f", ended {status_lines.when(run['ended'])}" if run.get("ended") else ""
        lines.append(
            f"last run: {run.get('status')} (started {status_lines.when(run.get('started'))}{ended}; "
            f"{run.get('jobs_done', 0)} jobs done, {run.get('jobs_failed', 0)} failed)"
        )
    else:
        lines.append("last run: none recorded")
    lines.append(f"next timer run: {timer}")
    if guard:
        lines.append(f"no new case starts: {guard}")
    if network:
        lines.append(network)
    return Group(table, Text("\n".join(lines)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.status",
        description="Every case's state, read from the case folders (works during a run); `bin/mqi status`.",
    )
    settings.add_site_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--failed", action="store_true", help="only failed, retrying and changed cases")
    parser.add_argument("--since", type=float, metavar="HOURS", help="only cases that changed state in the last HOURS")
    parser.add_argument("--unsigned", action="store_true", help="only finished cases waiting for a sign-off")
    parser.add_argument("--all", action="store_true", help="every finished case too (default: the last --recent)")
    parser.add_argument("--recent", type=int, default=20, help="finished cases shown without --all (default 20)")
    parser.add_argument("--watch", action="store_true", help="refresh live until Ctrl-C")
    parser.add_argument("--interval", type=float, default=2.0, help="--watch refresh period in seconds")
    args = parser.parse_args(argv)
    try:
        workdir, config, layout = state.open_site(args)
    except (OSError, ValueError) as exc:
        print(f"mqi status: {exc}", file=sys.stderr)
        return 2
    if not layout.scan_dir.is_dir():
        print(
            f"mqi status: the scan folder {layout.scan_dir} (paths.local.scan_directory) is not a folder",
            file=sys.stderr,
        )
        return 2
    since = time.time() - args.since * 3600 if args.since is not None else None

    def snapshot() -> tuple[list[CaseStatus], list[CaseStatus], dict[str, Any], str]:
        run = last_run(workdir)  # one reading for the cases and the run line: they agree
        cases = collect(layout, workdir, run)
        short = disk_guard.shortages(config, workdir)
        guard = disk_guard.held_back_reason(short) if short else ""
        hold_back(cases, guard)
        return cases, select(cases, args.failed, since, args.all, args.recent, args.unsigned), run, guard

    if args.json:
        cases, shown, run, guard = snapshot()
        print(
            json.dumps(
                {
                    "total": len(cases),
                    "cases": [asdict(c) for c in shown],
                    "last_run": run,
                    "disk_guard": guard,
                    "next_timer_run": status_lines.next_timer_run(),
                    "dicom_receiver": status_lines.receiver_line(config, workdir),
                    "dicom_assembly": status_lines.assembly_line(config, workdir),
                }
            )
        )
        return 0
    from rich.console import Console

    console = Console()
    timer = status_lines.next_timer_run()

    def view() -> Any:
        cases, shown, run, guard = snapshot()
        return render(cases, shown, run, timer, guard, status_lines.network_lines(config, workdir))

    if not args.watch:
        console.print(view())
        return 0
    from rich.live import Live

    with Live(view(), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(args.interval)
                live.update(view())
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

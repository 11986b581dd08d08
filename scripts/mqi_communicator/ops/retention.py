"""Retention: a finished case keeps its clinical record; its regenerable intermediates go after
`retention.intermediates_days` (docs/retention.md, which lists every file a case holds, record or
regenerable).

Regenerable, and removed: P2's CSVs (`<processing>/moqui_csv/`), the MOQUI inputs and per-layer
files (`<processing>/moqui/`), and the engine's outputs in the raw folder (`<beam>_Dose.raw`,
`<beam>.moqui/`). Everything else stays byte-identical. A finished case never enters the DAG
again (ops.state.targets), so nothing asks for the removed files; `bin/mqi reprocess` rebuilds
them from the case's inputs.

Which cases are due is read from a small queue, `.mqi/retention-queue.jsonl` (one line per
finished case not yet pruned, appended by the run recorder when a case finishes): a run reads
only that queue, never the finished cases, so its cost does not grow with the history. A missing
queue is built once from the finished cases (their summaries' times). The timer runs prune
(the run recorder, when a run starts and when it ends); `bin/mqi prune` does the same by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import write_atomic, write_json_atomic
from mqi_communicator.ops import state

QUEUE = Path(".mqi") / "retention-queue.jsonl"
LOCK = Path(".mqi") / "retention.lock"
PRUNED = "state/pruned.json"
# Snakemake's record of each output it wrote (its default file persistence): one file per output
# path, named by the path's urlsafe base64.
METADATA = Path(".snakemake") / "metadata"
DAY = 86400.0
# Cases one timer run prunes at most (oldest first): a site that turns retention on with years of
# finished cases works through them over a few runs instead of one long one.
PER_RUN = 50


def retention_days(config: dict[str, Any]) -> float | None:
    """`retention.intermediates_days`: None = never prune."""
    value = (config.get("retention") or {}).get("intermediates_days", 30)
    return None if value is None else float(value)


def regenerable_paths(layout: state.Layout, case_id: str) -> list[Path]:
    """The case's regenerable intermediates that exist: named one by one (never "everything but
    the record"), so that a configuration putting the raw folder inside the processing folder
    cannot make the record look regenerable."""
    processing = layout.processing(case_id)
    raw = Path(layout.raw_template.replace("{case_id}", case_id))
    found = [processing / "moqui_csv", processing / "moqui"]
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(raw) as entries:
        for entry in entries:
            is_dose = entry.name.endswith("_Dose.raw") and entry.is_file(follow_symlinks=False)
            is_engine_folder = entry.name.endswith(".moqui") and entry.is_dir(follow_symlinks=False)
            if is_dose or is_engine_folder:
                found.append(Path(entry.path))
    return sorted(p for p in found if p.exists() or p.is_symlink())


def _files_under(path: Path) -> Iterator[Path]:
    if path.is_dir() and not path.is_symlink():
        for folder, _dirs, files in os.walk(path):
            for name in files:
                yield Path(folder) / name
    else:
        yield path


def metadata_record(workdir: Path, output: Path) -> list[Path]:
    """Where Snakemake may keep its record of `output`: keyed by the path as the rule named it,
    relative to the workdir when inside it (the default config), else absolute."""
    keys = {str(output)}
    with contextlib.suppress(ValueError):
        keys.add(str(output.relative_to(workdir)))
    paths = []
    for key in sorted(keys):
        encoded = urlsafe_b64encode(key.encode()).decode()
        if len(encoded) < 255:  # longer ids are split into folders by Snakemake; not ours to guess
            paths.append(workdir / METADATA / encoded)
    return paths


def prune_case(layout: state.Layout, workdir: Path, case_id: str, now: float | None = None) -> int:
    """Remove a finished case's regenerable intermediates and Snakemake's records of them; write
    `state/pruned.json`. Returns the bytes freed. Safe to repeat after a crash midway: what is
    left is removed by the next call."""
    processing = layout.processing(case_id)
    if not (processing / state.SUMMARY).is_file():
        raise ValueError(f"case {case_id} is not finished ({processing / state.SUMMARY} missing); nothing pruned")
    if (state.read_json(processing / state.RUNNING) or {}).get("jobs"):
        raise ValueError(f"case {case_id} has running jobs; nothing pruned")
    freed = 0
    removed = []
    for path in regenerable_paths(layout, case_id):
        for file in _files_under(path):
            with contextlib.suppress(OSError):
                freed += file.lstat().st_size
            for entry in metadata_record(workdir, file):
                entry.unlink(missing_ok=True)
        for entry in metadata_record(workdir, path):
            entry.unlink(missing_ok=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(workdir)) if path.is_relative_to(workdir) else str(path))
    earlier = state.read_json(processing / PRUNED)
    if earlier is not None and not removed:
        return 0  # pruned before (by hand, or a run that stopped before updating the queue)
    earlier = earlier or {}
    record = {
        "pruned": now or time.time(),
        "removed": sorted({*earlier.get("removed", []), *removed}),
        "bytes": int(earlier.get("bytes", 0)) + freed,
        "rebuild": f"bin/mqi reprocess {case_id}",
    }
    write_json_atomic(processing / PRUNED, record)
    return freed


# -- the queue ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    """The queue is appended by a run and rewritten by a prune: one at a time."""
    path = workdir / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _line(case_id: str, finished: float) -> str:
    return json.dumps({"case": case_id, "finished": finished}) + "\n"


def _write_queue(workdir: Path, entries: dict[str, float]) -> None:
    ordered = sorted(entries.items(), key=lambda kv: (kv[1], kv[0]))
    write_atomic(workdir / QUEUE, "".join(_line(c, t) for c, t in ordered).encode())


def _bootstrap(layout: state.Layout, workdir: Path) -> dict[str, float]:
    """The queue of a site without one (first run of this version): every finished case not yet
    pruned, by its summary's time. Read once; from then on the queue is kept up to date."""
    entries = {}
    for case_id in state.finished(layout):
        processing = layout.processing(case_id)
        if (processing / PRUNED).exists():
            continue
        with contextlib.suppress(OSError):
            entries[case_id] = (processing / state.SUMMARY).stat().st_mtime
    _write_queue(workdir, entries)
    return entries


def _read_queue(layout: state.Layout, workdir: Path) -> dict[str, float]:
    """Case -> finish time; a case listed twice (reprocessed, finished again) by its latest line."""
    path = workdir / QUEUE
    if not path.exists():
        return _bootstrap(layout, workdir)
    entries: dict[str, float] = {}
    content = path.read_text()
    lines = content.splitlines()
    if lines and not content.endswith("\n"):
        lines.pop()  # an append cut short (the run was killed while writing it): not an entry yet
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
            entries[str(entry["case"])] = max(float(entry["finished"]), entries.get(str(entry["case"]), 0.0))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}, line {number}: not a retention queue entry ({exc})") from exc
    return entries


def enqueue(layout: state.Layout, workdir: Path, case_id: str, finished: float | None = None) -> None:
    """A case finished: it is due for pruning `retention.intermediates_days` from now."""
    with _locked(workdir):
        if not (workdir / QUEUE).exists():
            _bootstrap(layout, workdir)  # the case itself is among the finished ones
            return
        with open(workdir / QUEUE, "a") as handle:
            handle.write(_line(case_id, finished or time.time()))


def prune_due(
    layout: state.Layout,
    workdir: Path,
    days: float | None,
    now: float | None = None,
    say: Callable[[str], None] = print,
    limit: int | None = None,
) -> dict[str, int]:
    """Prune the queued cases finished `days` ago or earlier, oldest first, at most `limit`;
    returns bytes freed per case. A queued case that is no longer finished (reprocessed, archived)
    leaves the queue; one with running jobs waits for the next run."""
    if days is None:
        return {}
    now = time.time() if now is None else now
    freed: dict[str, int] = {}
    with _locked(workdir):
        entries = _read_queue(layout, workdir)
        due = sorted((t, c) for c, t in entries.items() if t <= now - days * DAY)[:limit]
        if not due:
            return {}
        for _finished, case_id in due:
            if not (layout.processing(case_id) / state.SUMMARY).is_file():
                del entries[case_id]
                continue
            try:
                freed[case_id] = prune_case(layout, workdir, case_id, now)
            except (OSError, ValueError) as exc:
                say(f"mqi retention: case {case_id} not pruned now: {exc}")
                continue
            del entries[case_id]
        _write_queue(workdir, entries)
    return freed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.retention",
        description="Remove finished cases' regenerable intermediates once due (`bin/mqi prune`); the timer "
        "runs do this themselves (docs/retention.md).",
    )
    parser.add_argument("cases", nargs="*", help="prune these finished cases now, whatever their age")
    settings.add_site_arguments(parser)
    args = parser.parse_args(argv)
    try:
        workdir, config, layout = state.open_site(args)
        if args.cases:
            freed = {case: prune_case(layout, workdir, case) for case in args.cases}
        else:
            freed = prune_due(layout, workdir, retention_days(config), say=lambda m: print(m, file=sys.stderr))
    except (OSError, ValueError) as exc:
        print(f"bin/mqi prune: {exc}", file=sys.stderr)
        return 1
    for case, count in freed.items():
        print(f"case {case}: intermediates removed ({count / 1e6:.1f} MB); the record is kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())

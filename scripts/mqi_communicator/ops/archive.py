"""`bin/mqi archive --older-than DAYS DEST`: move finished cases, whole, to DEST (docs/retention.md).

A case moves with everything that is its: its scan folder, its output folders (processing, raw,
RT Doses; their record), its step logs, and Snakemake's metadata of its outputs (one file per
output path under `.snakemake/metadata`, named by the path's urlsafe base64). In DEST it is one
folder, `DEST/<case_id>/`:

    archive.json        what was moved from where, each file's size and sha256, when it finished,
                        its verdict
    scan/               the case folder as the sender delivered it
    outputs/<path>      each output folder, by its path relative to the workdir (`outputs/abs/...`
                        for one outside it)
    snakemake-metadata/ Snakemake's records of the case's outputs

Never lost, never half-moved: the case is copied into `DEST/.partial-<case_id>`, every copy's
sha256 is checked against the original, the folder is renamed to `DEST/<case_id>` (one rename),
the archive index (`.mqi/archive-index.jsonl`) gets the case, and only then is the origin removed,
the ready marker first, so that no run takes a half-removed case for a new one. A crash before the
rename leaves the case whole at its origin (the next archive removes the partial copy and starts
again); after it, whole in DEST (the next archive checks DEST against archive.json and finishes
removing the origin). Status and the QA trend still count an archived case: status reads the
index, and the case's trend points are put into the trend ledger before it moves.

Only finished cases move: not a case still in work, failed, with running jobs, or whose inputs
changed after it finished (it waits for a decision: `bin/mqi reprocess` or not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import sha256_of, write_json_atomic
from mqi_communicator.intake.fraction_watch import summary_line
from mqi_communicator.ops import state
from mqi_communicator.ops.retention import METADATA, metadata_record

INDEX = Path(".mqi") / "archive-index.jsonl"
MANIFEST = "archive.json"
PARTIAL = ".partial-"
TREND_LEDGER = Path("results") / "qa_history.jsonl"  # rules/qa.smk, rule qa_trend
DAY = 86400.0


def parts(layout: state.Layout, workdir: Path, case_id: str) -> list[tuple[str, Path]]:
    """(name in the archive, origin) of each folder that is the case's."""
    found = [("scan", layout.scan_dir / case_id)]
    for folder in layout.output_dirs(case_id):
        try:
            name = "outputs/" + str(folder.relative_to(workdir))
        except ValueError:
            name = "outputs/abs/" + str(folder).lstrip("/")
        found.append((name, folder))
    return [(name, path) for name, path in found if path.is_dir()]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def metadata_of(workdir: Path, outputs: list[Path]) -> list[Path]:
    """Snakemake's metadata files of every file and folder under the case's output folders."""
    found: set[Path] = set()
    for root in outputs:
        for path in [root, *root.rglob("*")]:
            found.update(m for m in metadata_record(workdir, path) if m.is_file())
    return sorted(found)


def finished_at(layout: state.Layout, case_id: str) -> float | None:
    with contextlib.suppress(FileNotFoundError):
        return (layout.processing(case_id) / state.SUMMARY).stat().st_mtime
    return None


def refusal(layout: state.Layout, case_id: str) -> str | None:
    """Why this case may not be archived (None: it may)."""
    processing = layout.processing(case_id)
    if not (processing / state.SUMMARY).is_file():
        return "not finished"
    if (state.read_json(processing / state.RUNNING) or {}).get("jobs"):
        return "has running jobs"
    if (processing / state.CHANGED).exists():
        return "its inputs changed after it finished (bin/mqi status); decide first"
    if (processing / state.FAILED).exists():
        return "has a recorded failure (a later fraction's record); see bin/mqi status"
    return None


def _keep_trend_points(layout: state.Layout, workdir: Path, case_id: str) -> None:
    """The case's points into the trend ledger (built first if missing), so the trend keeps them
    once its qa.json is gone."""
    qa = layout.processing(case_id) / "qa" / "qa.json"
    if not qa.is_file():
        return
    from mqi_communicator.qa.trend_points import update_ledger  # numpy: only when a case moves

    history = str(layout.processing("*") / "qa" / "qa.json")
    update_ledger(workdir / TREND_LEDGER, [qa], history)


def _copy(origin: Path, target: Path) -> None:
    """A folder or file with its times (copy2), links as links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if origin.is_dir() and not origin.is_symlink():
        shutil.copytree(origin, target, symlinks=True, copy_function=shutil.copy2)
    else:
        shutil.copy2(origin, target, follow_symlinks=False)


def _checksums(root: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for path in _files(root):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries[rel] = {"link": os.readlink(path)}
        else:
            entries[rel] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return entries


def verify_copy(archived: Path, manifest: dict[str, Any]) -> list[str]:
    """Files of the manifest that are missing or differ in DEST ([] when the copy is whole)."""
    bad = []
    for rel, entry in manifest["files"].items():
        path = archived / rel
        if "link" in entry:
            ok = path.is_symlink() and os.readlink(path) == entry["link"]
        else:
            ok = path.is_file() and path.stat().st_size == entry["size"] and sha256_of(path) == entry["sha256"]
        if not ok:
            bad.append(rel)
    return bad


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_origin(layout: state.Layout, workdir: Path, archived: Path, manifest: dict[str, Any]) -> None:
    """The origin of a case whose copy in DEST is whole: the ready marker first (no run may take
    what is left for a new case), the scan folder, Snakemake's metadata, the outputs."""
    scan = Path(manifest["origins"]["scan"])
    (scan / layout.ready_marker).unlink(missing_ok=True)
    _remove(scan)
    for name in manifest["metadata"]:
        (workdir / METADATA / name).unlink(missing_ok=True)
    for name, origin in manifest["origins"].items():
        if name != "scan":
            _remove(Path(origin))
            # The case's own folder that held its output folders (data/cases/<case_id>), once empty.
            parent = Path(origin).parent
            if parent.name == manifest["case"]:
                with contextlib.suppress(OSError):
                    parent.rmdir()
    manifest["origin_removed"] = time.time()
    write_json_atomic(archived / MANIFEST, manifest)


def _index(workdir: Path, entry: dict[str, Any]) -> None:
    path = workdir / INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_index(workdir: Path) -> dict[str, dict[str, Any]]:
    """Archived cases by id (the latest line of a case)."""
    entries: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (workdir / INDEX).read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                entries[str(entry["case"])] = entry
    return entries


def archive_case(layout: state.Layout, workdir: Path, case_id: str, dest: Path) -> Path:
    """Move one finished case to `dest/<case_id>`; returns that folder."""
    why = refusal(layout, case_id)
    if why:
        raise ValueError(f"case {case_id} is not archived: {why}")
    archived = dest / case_id
    if archived.exists():
        raise ValueError(f"{archived} already exists; case {case_id} is not archived twice")
    staging = dest / f"{PARTIAL}{case_id}"
    if staging.exists():
        shutil.rmtree(staging)  # an earlier archive stopped before its rename: the origin is whole
    found = parts(layout, workdir, case_id)
    outputs = [path for name, path in found if name != "scan"]
    metadata = metadata_of(workdir, outputs)
    summary = state.read_json(layout.processing(case_id) / state.SUMMARY) or {}
    # As `bin/mqi status` shows a finished case: the verdict, then its fraction records.
    fractions = summary_line(layout.processing(case_id))
    verdict = "; ".join(v for v in (state.summary_verdict(summary), fractions) if v)
    _keep_trend_points(layout, workdir, case_id)
    files: dict[str, dict[str, Any]] = {}
    for name, origin in found:
        _copy(origin, staging / name)
        files |= {f"{name}/{rel}": entry for rel, entry in _checksums(origin).items()}
    for path in metadata:
        _copy(path, staging / "snakemake-metadata" / path.name)
    manifest = {
        "case": case_id,
        "finished": finished_at(layout, case_id),
        "verdict": verdict,
        "archived": time.time(),
        "origins": {name: str(path) for name, path in found},
        "metadata": [p.name for p in metadata],
        "files": files,
    }
    bad = verify_copy(staging, manifest)
    if bad:
        shutil.rmtree(staging)
        raise OSError(
            f"case {case_id}: the copy in {dest} differs from the original ({', '.join(bad[:3])}); nothing moved"
        )
    write_json_atomic(staging / MANIFEST, manifest)
    os.rename(staging, archived)
    _index(workdir, {k: manifest[k] for k in ("case", "finished", "verdict", "archived")} | {"dest": str(archived)})
    _remove_origin(layout, workdir, archived, manifest)
    return archived


def resume(layout: state.Layout, workdir: Path, dest: Path) -> list[str]:
    """Finish what an interrupted archive left: partial copies go (their origin is whole); a case
    whole in DEST whose origin is not yet removed is checked and its origin removed."""
    finished: list[str] = []
    if not dest.is_dir():
        return finished
    for entry in sorted(dest.iterdir()):
        if entry.name.startswith(PARTIAL):
            shutil.rmtree(entry)
            continue
        manifest = state.read_json(entry / MANIFEST)
        if manifest is None or manifest.get("origin_removed"):
            continue
        bad = verify_copy(entry, manifest)
        if bad:
            raise OSError(f"{entry}: differs from its archive.json ({', '.join(bad[:3])}); its origin is kept")
        if str(manifest["case"]) not in read_index(workdir):
            _index(
                workdir, {k: manifest[k] for k in ("case", "finished", "verdict", "archived")} | {"dest": str(entry)}
            )
        _remove_origin(layout, workdir, entry, manifest)
        finished.append(str(manifest["case"]))
    return finished


def due(layout: state.Layout, older_than_days: float, now: float) -> list[str]:
    """Finished cases that finished at least `older_than_days` ago, oldest first."""
    cases = []
    for case_id in state.finished(layout):
        when = finished_at(layout, case_id)
        if when is not None and when <= now - older_than_days * DAY:
            cases.append((when, case_id))
    return [case for _, case in sorted(cases)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.archive",
        description="Move finished cases (scan folder, outputs, record, Snakemake's metadata) to DEST "
        "(`bin/mqi archive`); status and the QA trend still count them.",
    )
    parser.add_argument("dest", type=Path, help="the archive folder (created if missing)")
    parser.add_argument("--older-than", type=float, required=True, metavar="DAYS", help="finished this long ago")
    parser.add_argument("--dry-run", action="store_true", help="list the cases, move nothing")
    settings.add_site_arguments(parser)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    dest = args.dest if args.dest.is_absolute() else (Path.cwd() / args.dest)
    failures = 0
    try:
        config = settings.load_site(args.configfile, workdir)
        layout = state.Layout.from_config(config, workdir)
        if dest.resolve().is_relative_to(layout.scan_dir.resolve()):
            raise ValueError(f"{dest} is inside the scan folder {layout.scan_dir}: it would look like a case")
        if args.dry_run:
            for case_id in due(layout, args.older_than, time.time()):
                print(f"case {case_id}: would be archived" + (f" ({why})" if (why := refusal(layout, case_id)) else ""))
            return 0
        dest.mkdir(parents=True, exist_ok=True)
        for case_id in resume(layout, workdir, dest):
            print(f"case {case_id}: an interrupted archive finished (its copy in {dest} checked)")
        for case_id in due(layout, args.older_than, time.time()):
            try:
                archived = archive_case(layout, workdir, case_id, dest)
            except (OSError, ValueError) as exc:
                failures += 1
                print(f"bin/mqi archive: {exc}", file=sys.stderr)
                continue
            print(f"case {case_id}: archived to {archived}")
    except (OSError, ValueError) as exc:
        print(f"bin/mqi archive: {exc}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Explicit acts on one case: reprocess a finished (or failed) case, or retry a failed one.

A finished case is a clinical record: nothing but `reprocess` makes the pipeline compute it again,
and the previous results are never overwritten: every output folder of the case is moved aside
as `<folder>.superseded-<UTC time>`. With `--from STEP`, the results of the steps before STEP are
copied back (timestamps kept), so the next run redoes STEP and what follows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mqi_communicator import settings
from mqi_communicator.files import write_json_atomic
from mqi_communicator.ops import state
from mqi_communicator.qa import signoff_record

# Each step and what it leaves in the case's folders (relative to processing / raw / dicom).
STEPS = ("intake", "interpret", "moqui_input", "simulate", "rtdose", "report")
KEPT_BY_STEP = {
    "intake": [("processing", "intake.json")],
    "interpret": [("processing", "moqui_csv")],
    "moqui_input": [("processing", "moqui")],
    "simulate": [("raw", "")],
    "rtdose": [("dicom", "")],
}


def _running(layout: state.Layout, case_id: str) -> bool:
    return bool((state.read_json(layout.processing(case_id) / state.RUNNING) or {}).get("jobs"))


def reprocess(layout: state.Layout, case_id: str, from_step: str = "intake") -> list[tuple[Path, Path]]:
    """Move the case's outputs aside; restore those of the steps before `from_step`. Returns the
    (folder, where it went) pairs."""
    if from_step not in STEPS:
        raise ValueError(f"unknown step {from_step!r}; one of {', '.join(STEPS)}")
    if not (layout.scan_dir / case_id).is_dir():
        raise ValueError(f"no case folder {layout.scan_dir / case_id}")
    if _running(layout, case_id):
        raise ValueError(f"case {case_id} has running jobs (bin/mqi status); stop the run first")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    roots = {
        "processing": layout.processing(case_id),
        "raw": Path(layout.raw_template.replace("{case_id}", case_id)),
        "dicom": Path(layout.dicom_template.replace("{case_id}", case_id)),
    }
    moved = []
    for folder in layout.output_dirs(case_id):
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.superseded-{stamp}")
            folder.rename(aside)
            moved.append((folder, aside))
    aside_of = dict(moved)
    for step in STEPS[: STEPS.index(from_step)]:
        for root_name, rel in KEPT_BY_STEP.get(step, []):
            target = roots[root_name] / rel if rel else roots[root_name]
            source = _superseded_copy(target, aside_of)
            if source is None or not source.exists():
                continue
            if source.is_dir():
                shutil.copytree(source, target, copy_function=shutil.copy2, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    # The sign-off record goes with the case, not with the results it signed: its signatures show
    # as VOID against the new qa.json (docs/sign-off.md).
    signed = _superseded_copy(roots["processing"] / signoff_record.FOLDER, aside_of)
    if signed is not None and signed.is_dir():
        shutil.copytree(signed, roots["processing"] / signoff_record.FOLDER, copy_function=shutil.copy2)
    record = {"requested": time.time(), "from": from_step, "superseded": {str(a): str(b) for a, b in moved}}
    write_json_atomic(roots["processing"] / "state" / "reprocess.json", record)
    return moved


def _superseded_copy(path: Path, aside_of: dict[Path, Path]) -> Path | None:
    """Where `path` is now that the folder holding it was moved aside."""
    for folder, aside in aside_of.items():
        if path == folder or folder in path.parents:
            return aside / path.relative_to(folder)
    return None


def retry(layout: state.Layout, case_id: str) -> str:
    processing = layout.processing(case_id)
    failure = state.Failure.read(processing / state.FAILED)
    if failure is None:
        raise ValueError(f"case {case_id} has no recorded failure (bin/mqi status)")
    (processing / state.RETRY).parent.mkdir(parents=True, exist_ok=True)
    (processing / state.RETRY).write_text(f"requested {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return f"case {case_id}: the next run tries it again (it failed at {failure.step})"


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--configfile", default=None, help="the site's config (default: config/config.yaml)")
    common.add_argument("--workdir", type=Path, default=Path.cwd(), help="where the workflow runs (default: here)")
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.reprocess",
        description="Explicit acts on one case (`bin/mqi reprocess|retry`).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    again = sub.add_parser(
        "reprocess", parents=[common], help="compute a case again; its previous results are moved aside, not lost"
    )
    again.add_argument("case")
    again.add_argument("--from", dest="from_step", default="intake", choices=STEPS, help="first step to redo")
    retry_parser = sub.add_parser("retry", parents=[common], help="try a failed case again in the next run")
    retry_parser.add_argument("case")
    args = parser.parse_args(argv)
    try:
        layout = state.Layout.from_config(settings.load_site(args.configfile, args.workdir), args.workdir.resolve())
        if args.command == "retry":
            print(retry(layout, args.case))
            return 0
        moved = reprocess(layout, args.case, args.from_step)
    except (OSError, ValueError) as exc:
        print(f"bin/mqi {args.command}: {exc}", file=sys.stderr)
        return 1
    for folder, aside in moved:
        print(f"kept the previous results: {folder} -> {aside}")
    print(f"case {args.case}: the next run redoes it from {args.from_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

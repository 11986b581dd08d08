# Helpers and input functions shared by the rules: case discovery, paths, settings.
import json
import os
import sys
from pathlib import Path

from mqi_communicator.intake import CASE_ID_PATTERN, is_ready, recorded_failure

# The Python that runs Snakemake (the project's venv) runs the package's CLIs too.
PYTHON = sys.executable
SCAN_DIR = Path(config["paths"]["local"]["scan_directory"])
PROCESSING = config["paths"]["local"]["processing_directory"]


wildcard_constraints:
    case_id="[A-Za-z0-9._-]+",


def processing(name, case_id="{case_id}"):
    """A file or folder in a case's processing directory (a `{case_id}` pattern by default)."""
    return os.path.join(PROCESSING.replace("{case_id}", case_id), name)


def intake_failure_record(case_id):
    return Path(processing("intake.failed.json", case_id))


def ready_cases():
    """Case folders that are ready and not an unchanged, already failed case."""
    if not SCAN_DIR.is_dir():
        raise WorkflowError(
            f"paths.local.scan_directory {SCAN_DIR} does not exist or is not a folder"
        )
    app = config["application"]
    cases = []
    for case_dir in sorted(p for p in SCAN_DIR.iterdir() if p.is_dir()):
        if not CASE_ID_PATTERN.match(case_dir.name):
            logger.warning(
                f"skipping {case_dir}: case folder names must match [A-Za-z0-9._-]+"
            )
            continue
        if not is_ready(case_dir, app["ready_marker"], app["ready_quiet_seconds"]):
            continue
        error = recorded_failure(intake_failure_record(case_dir.name), case_dir)
        if error is not None:
            logger.warning(
                f"skipping case {case_dir.name}: intake failed and nothing in it changed since "
                f"({error.splitlines()[0]}); see {intake_failure_record(case_dir.name)}"
            )
            continue
        cases.append(case_dir.name)
    return cases


CASES = ready_cases()


def settings_for(*sections):
    """The config sections a CLI uses, as inline JSON: exactly what Snakemake resolved, and a
    rule's params change (so Snakemake reruns it) only when a section it depends on changes.
    """
    return json.dumps({name: config[name] for name in sections}, sort_keys=True)


def case_files(wildcards):
    """Every file of the case, so a late or replaced file reruns intake and what follows."""
    case_dir = SCAN_DIR / wildcards.case_id
    return sorted(str(p) for p in case_dir.rglob("*") if p.is_file())


def all_targets():
    return [processing("moqui_csv", case) for case in CASES]

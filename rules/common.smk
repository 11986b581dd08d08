# Helpers and input functions shared by the rules: case discovery, paths, settings.
import json
import os
import sys
from pathlib import Path

from mqi_communicator.intake import (
    CASE_ID_PATTERN,
    case_readiness,
    is_ready,
    recorded_failure,
)
from mqi_communicator.settings import path_problems

# Scan folder empty, or outputs inside it (the DAG would feed on its own outputs): stop now.
for problem in path_problems(config):
    raise WorkflowError(f"invalid configuration: {problem}")

# The Python that runs Snakemake (the project's venv) runs the package's CLIs too.
PYTHON = sys.executable
SCAN_DIR = Path(config["paths"]["local"]["scan_directory"])
PROCESSING = config["paths"]["local"]["processing_directory"]
RAW_OUTPUT = config["paths"]["local"]["raw_output_directory"]
FINAL_DICOM = config["paths"]["local"]["final_dicom_directory"]
BUILTIN_ENGINE = config["executables"]["moqui"] == "builtin"
# Written into every RT Dose and the report, so nobody mistakes the stand-in for Monte Carlo.
ENGINE_LABEL = (
    "built-in analytical pencil beam (not Monte Carlo)"
    if BUILTIN_ENGINE
    else "MOQUI Monte Carlo"
)


wildcard_constraints:
    case_id="[A-Za-z0-9._-]+",
    beam="[A-Za-z0-9_-]+",


def processing(name, case_id="{case_id}"):
    """A file or folder in a case's processing directory (a `{case_id}` pattern by default)."""
    return os.path.join(PROCESSING.replace("{case_id}", case_id), name)


def raw_output(name, case_id="{case_id}"):
    return os.path.join(RAW_OUTPUT.replace("{case_id}", case_id), name)


def final_dicom(name, case_id="{case_id}"):
    return os.path.join(FINAL_DICOM.replace("{case_id}", case_id), name)


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
        if not Path(processing("intake.json", case_dir.name)).exists():
            # Deliveries still missing: wait (said on the console), or let intake fail the case.
            state, reason = case_readiness(case_dir, config)
            if state == "waiting":
                logger.warning(f"case {case_dir.name}: {reason}")
                continue
        cases.append(case_dir.name)
    return cases


CASES = ready_cases()


def settings_for(*sections):
    """The config sections a CLI uses, as inline JSON: exactly what Snakemake resolved, and a
    rule's params change (so Snakemake reruns it) only when a section it depends on changes.
    A function, because Snakemake fills wildcards into string params, and paths.* hold the
    literal `{case_id}` placeholder."""
    text = json.dumps({name: config[name] for name in sections}, sort_keys=True)
    return lambda wildcards: text


def case_files(wildcards):
    """Every file of the case, so a late or replaced file reruns intake and what follows."""
    case_dir = SCAN_DIR / wildcards.case_id
    return sorted(str(p) for p in case_dir.rglob("*") if p.is_file())


def rtdose_calibration_args():
    """RT Dose in GY only when a calibration factor is configured; RELATIVE otherwise."""
    factor = config["simulation"]["dose_scale_factor"]
    return "" if factor is None else f"--calibrated --dose-scale {factor}"


def manifest(case_id):
    """The case's intake manifest; waits for the intake checkpoint (beams are known after it)."""
    return json.loads(
        Path(checkpoints.intake.get(case_id=case_id).output[0]).read_text()
    )


def dose_label(wildcards):
    """The engine label, preceded by the case's labels (PLAN-BASED, FLAGGED): it goes into the
    RT Dose's SeriesDescription, DoseComment and ImageComments, and the report's titles.
    """
    labels = manifest(wildcards.case_id).get("labels", [])
    return " ".join([f"[{label}]" for label in labels] + [ENGINE_LABEL])


def simulated_beams(case_id):
    return [b["sanitized_name"] for b in manifest(case_id)["beams"] if b["simulate"]]


def beam_number(wildcards):
    beams = manifest(wildcards.case_id)["beams"]
    return next(b["number"] for b in beams if b["sanitized_name"] == wildcards.beam)


def plan_copy(wildcards):
    """The plan as P2 copied it into its output folder (rules take that folder as input)."""
    name = manifest(wildcards.case_id)["plan"]["file_name"]
    return os.path.join(processing("moqui_csv", wildcards.case_id), "plan", name)


def beam_parameter_files(wildcards):
    return [
        processing(f"moqui/{beam}/moqui_tps_{beam}.in", wildcards.case_id)
        for beam in simulated_beams(wildcards.case_id)
    ]


def beam_raw_doses(wildcards):
    return [
        raw_output(f"{beam}_Dose.raw", wildcards.case_id)
        for beam in simulated_beams(wildcards.case_id)
    ]


def beam_records(wildcards):
    return [
        raw_output(f"{beam}.simulate.json", wildcards.case_id)
        for beam in simulated_beams(wildcards.case_id)
    ]


def beam_rtdoses(wildcards):
    return [
        final_dicom(f"RD_{beam}.dcm", wildcards.case_id)
        for beam in simulated_beams(wildcards.case_id)
    ]


def beam_figures(wildcards):
    return [
        processing(f"report/dose_{beam}.png", wildcards.case_id)
        for beam in simulated_beams(wildcards.case_id)
    ]


def all_targets(wildcards):
    # One summary per case; the checkpoint is resolved in each case's own input function, so
    # one case's pending intake never hides the others from a dry-run.
    return [processing("case_summary.json", case) for case in CASES]

# Helpers and input functions shared by the rules: case discovery, paths, settings.
import functools
import json
import os
import shlex
import sys
from pathlib import Path

from mqi_communicator.intake.case_inputs import content_digest
from mqi_communicator.errors import CaseError
from mqi_communicator.intake.case import case_readiness
from mqi_communicator.formats import contracts
from mqi_communicator.formats.plan import find_plan, read_plan
from mqi_communicator.rtdose.dose_frame import plan_sum_refusal_for
from mqi_communicator.ops import disk_guard, recorder, state, step_server
from mqi_communicator.qa import calibration
from mqi_communicator.qa.fraction_records import (
    pending as pending_fractions,
    scan_finished,
)
from mqi_communicator.settings import (
    RUNTIME_VARIABLE,
    operational_keys,
    operational_part,
    path_problems,
    result_part,
    template_problems,
)

# Scan folder empty, or outputs inside it (the DAG would feed on its own outputs), or a dose
# scaled twice: stop now.
for problem in path_problems(config) + template_problems(config):
    raise WorkflowError(f"invalid configuration: {problem}")

# The Python that runs Snakemake (the project's venv) runs the package's CLIs too, each started
# through the step client: in a process forked from this run's step server when there is one
# (started below), else as `python -m` (docs/end-to-end-speed.md).
PYTHON = step_server.client_python()
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
LAYOUT = state.Layout.from_config(config)
# The run recorder (logger plugin `mqi`, in this process) writes each case's state files.
recorder.configure(config)


wildcard_constraints:
    case_id="[A-Za-z0-9._-]+",
    beam="[A-Za-z0-9_-]+",
    fraction="[0-9]+",


def processing(name, case_id="{case_id}"):
    """A file or folder in a case's processing directory (a `{case_id}` pattern by default)."""
    return os.path.join(PROCESSING.replace("{case_id}", case_id), name)


def raw_output(name, case_id="{case_id}"):
    return os.path.join(RAW_OUTPUT.replace("{case_id}", case_id), name)


def final_dicom(name, case_id="{case_id}"):
    return os.path.join(FINAL_DICOM.replace("{case_id}", case_id), name)


def case_targets():
    """Cases that still need work. A finished case is final: it never enters the DAG again,
    whatever changed in the config, the profile or the code (`bin/mqi reprocess` redoes one).
    """
    try:
        cases = state.targets(LAYOUT, logger.warning)
    except ValueError as exc:
        raise WorkflowError(str(exc))
    # Too little free space: no case starts, so nothing is half-written (docs/disk-guard.md).
    short = disk_guard.shortages(config, Path.cwd()) if cases else []
    if short:
        logger.warning(
            f"{len(cases)} case(s) held back: {disk_guard.held_back_reason(short)}"
        )
        return []
    return [case for case in cases if not waiting_for_deliveries(case)]


def waiting_for_deliveries(case_id):
    """A case whose plan has beams without delivery logs waits for them (said on the console)
    until application.delivery_wait_seconds, then intake fails it naming them."""
    if Path(processing("intake.json", case_id)).exists():
        return False
    readiness, reason = case_readiness(SCAN_DIR / case_id, config)
    if readiness == "waiting":
        logger.warning(f"case {case_id}: {reason}")
    return readiness == "waiting"


# `snakemake --report` shows the finished cases: only then do they enter the DAG, and nothing
# runs; cases still in work are left out (their files are not there yet). Snakemake offers no
# other way to tell a report from a run while it parses the workflow.
REPORT = any(arg == "--report" or arg.startswith("--report=") for arg in sys.argv)
CASES = state.finished(LAYOUT) if REPORT else case_targets()
# Status tells the cases this run takes from those the next run takes (docs/operations.md).
recorder.plan(CASES)


# Settings that never change a result (how long to wait, which GPU, where to connect, whom to
# alert) are marked `x-operational: true` in config/schema/config.schema.yaml, and only there.
# They reach the steps through the environment, MQI_RUNTIME_SETTINGS (declared by `envvars:` in
# the Snakefile, so cluster jobs get them too), never through params: changing one must not
# rerun anything (docs/development.md#configuration).
OPERATIONAL = operational_keys()
RUNTIME_ENVIRONMENT = {
    # Read by mqi_communicator.settings.load on top of --settings.
    RUNTIME_VARIABLE: json.dumps(operational_part(config, OPERATIONAL), sort_keys=True),
    "MQI_MOQUI_DIR": str(config["paths"]["local"]["moqui_dir"]),
}
os.environ.update(RUNTIME_ENVIRONMENT)


def settings_for(*sections):
    """The config sections a CLI uses, without their operational keys, as inline JSON: exactly
    what Snakemake resolved, and a rule's params change (so Snakemake reruns it) only when a
    result setting of a section it depends on changes. A function, because Snakemake fills
    wildcards into string params, and paths.* hold the literal `{case_id}` placeholder.
    """
    text = json.dumps(
        {name: result_part(config[name], (name,), OPERATIONAL) for name in sections},
        sort_keys=True,
    )
    return lambda wildcards: text


def case_content_digest(wildcards):
    """The case's content digest: the manifest's while no file was touched since intake, so an
    unchanged case is not read again at each DAG build (see mqi_communicator.intake.case_inputs).
    """
    manifest_path = Path(processing("intake.json", wildcards.case_id))
    known = (
        read_manifest(str(manifest_path)).get("inputs")
        if manifest_path.exists()
        else None
    )
    return content_digest(SCAN_DIR / wildcards.case_id, known)


def current_calibration(wildcards, input):
    """The calibration entry of this engine and the case's room, or None (docs/qa.md):
    read when the job is planned, so a new calibration reruns what depends on it."""
    room = read_manifest(input.manifest)["room"]
    record = Path(config["calibration"]["record"])
    try:
        entry = calibration.current(record, calibration.engine_kind(config), room)
    except calibration.CalibrationError as exc:
        raise WorkflowError(str(exc))
    return None if entry is None else entry.as_dict()


def rtdose_calibration_args(wildcards, input):
    """RT Dose in GY with the current calibration of the engine and room; RELATIVE without one."""
    entry = current_calibration(wildcards, input)
    return (
        "" if entry is None else f"--calibrated --dose-scale {entry['gy_per_unit']!r}"
    )


def calibration_json(wildcards, input):
    """The calibration entry QA judges the dose scale by, as JSON (`null` without one)."""
    return json.dumps(current_calibration(wildcards, input), sort_keys=True)


@functools.lru_cache(maxsize=None)
def _read_manifest(path, mtime_ns):
    return contracts.read_manifest(path)


def read_manifest(path):
    """Input functions ask for a manifest many times per DAG update: read each version once."""
    return _read_manifest(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=None)
def case_plan(case_id):
    """(path, Plan) of a case, read once per DAG build (the beams and the fraction checks)."""
    path = find_plan(SCAN_DIR / case_id)
    return path, read_plan(path)


@functools.lru_cache(maxsize=None)
def planned(case_id):
    """The case's plan file name and treatment beams, read when the DAG is built. No checkpoint:
    the whole DAG is known up front, so a backlog of new cases is not re-evaluated after every
    intake. Intake then checks the case against the same plan; a plan that cannot be read here
    gives no beams, and intake fails the case with the reason."""
    try:
        path, plan = case_plan(case_id)
    except (CaseError, OSError, ValueError, KeyError, AttributeError) as exc:
        logger.debug(f"case {case_id}: plan not read at DAG build ({exc})")
        return {"file_name": None, "beams": {}, "plan_sum": False}
    return {
        "file_name": path.name,
        "beams": {b.sanitized_name: b.number for b in plan.treatment_beams},
        # Beams in different beam frames are not summed (dose_frame.plan_sum_refusal_for).
        "plan_sum": plan_sum_refusal_for(path, plan=plan) is None,
    }


def dose_label(wildcards, input):
    """The engine label, preceded by the case's labels (PLAN-BASED, FLAGGED, and DOSE SCALE NOT
    VERIFIED without a current calibration, as QA will say): it goes into the
    RT Dose's SeriesDescription, DoseComment and ImageComments, and the report's titles. Read
    from the manifest (an input), so Snakemake evaluates it once intake has run."""
    labels = read_manifest(input.manifest).get("labels", [])
    scale = calibration.status(
        current_calibration(wildcards, input), config["calibration"]["max_age_days"]
    )
    if scale["state"] != "current":
        labels = [*labels, calibration.UNVERIFIED_LABEL]
    return " ".join([f"[{label}]" for label in labels] + [ENGINE_LABEL])


def simulated_beams(case_id):
    return list(planned(case_id)["beams"])


def beam_options(wildcards):
    """`--beam=NAME` per beam, each shell-quoted (a beam name may begin with '-' or hold a space)."""
    return " ".join(
        f"--beam={shlex.quote(beam)}" for beam in simulated_beams(wildcards.case_id)
    )


def beam_number(wildcards):
    return planned(wildcards.case_id)["beams"][wildcards.beam]


def plan_copy(wildcards):
    """The plan as P2 copied it into its output folder (rules take that folder as input)."""
    name = planned(wildcards.case_id)["file_name"]
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
    """One summary per case that still needs work (finished ones are final: see case_targets).
    With none, the scan folder itself, so that Snakemake says "Nothing to be done"."""
    return [processing("case_summary.json", case) for case in CASES] or [str(SCAN_DIR)]


def qa_case_results(wildcards):
    """Every ready case's qa.json (the trend across cases)."""
    return [processing("qa/qa.json", case) for case in CASES]


def qa_targets(wildcards):
    # A report shows the trend only once a run has drawn it.
    trend = CASES and not (REPORT and not os.path.exists("results/qa_trend.png"))
    return (["results/qa_trend.png"] if trend else []) + qa_case_results(wildcards)


def plan_sum_dose(wildcards):
    """RD_PLAN.dcm only when the plan's treatment beams share one geometry (gantry, couch,
    table-top pitch and roll, isocentre, patient position: docs/plan-geometry.md)."""
    if not planned(wildcards.case_id)["plan_sum"]:
        return []
    return [final_dicom("RD_PLAN.dcm", wildcards.case_id)]


def plan_dose_arg(wildcards, input):
    paths = (
        [input.plan_dose] if isinstance(input.plan_dose, str) else list(input.plan_dose)
    )
    return " ".join(f"--plan-dose {shlex.quote(str(p))}" for p in paths)


def fraction_targets(wildcards):
    return [
        processing(f"fractions/{number}.json", case)
        for case, numbers in FRACTIONS.items()
        for number in numbers
    ]


def fraction_inputs(wildcards):
    """A new case's fractions are checked once intake accepted it. A finished case's record
    depends on no output of ours: its intake.json and results are final and never redone.
    """
    if os.path.exists(processing("case_summary.json", wildcards.case_id)):
        return []
    return [processing("intake.json", wildcards.case_id)]


def fraction_cases():
    """Complete fractions without a delivery record (docs/fractions.md), per case: of the cases
    this run works on, and of finished cases in whose folder a delivery folder arrived since
    their last record (two stats per finished case: state.finished_with_new_deliveries).
    """
    if REPORT:
        return {}
    found = {}
    for case in CASES:
        try:
            plan = case_plan(case)[1]
        except (CaseError, OSError, ValueError, KeyError, AttributeError):
            continue  # intake reports it
        numbers = pending_fractions(
            SCAN_DIR / case, Path(processing("", case)), config, plan=plan
        )
        if numbers:
            found[case] = numbers
    for case in state.finished_with_new_deliveries(LAYOUT, logger.warning):
        case_processing = Path(processing("", case))
        numbers, seen = scan_finished(SCAN_DIR / case, case_processing, config)
        if numbers:
            found[case] = numbers
        if seen is not None:
            # Nothing complete to record: remember the folder as seen (the recorder writes it
            # when a run starts), so this case is not read again at every DAG build.
            recorder.remember_seen(case_processing, seen)
    return found


FRACTIONS = fraction_cases()

# One step server for this run's jobs, when jobs will run here (not for a dry run, a report, a
# lint; not inside a SLURM job): the steps' imports are paid once (ops/step_server.py).
if (CASES or FRACTIONS) and step_server.wanted(sys.argv):
    STEP_SERVER = step_server.start()  # held (its lifeline open) until Snakemake exits

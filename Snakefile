# mqi_communicator: delivered-dose check of proton treatments with MOQUI.
# This file only wires things up; stages live in rules/, logic in scripts/mqi_communicator/.
from snakemake.utils import min_version, validate

min_version("9.20")

# Snakemake's own message for a YAML syntax error names neither the file nor the line.
from mqi_communicator.settings import yaml_problem

if yaml_problem("config/config.yaml"):
    raise WorkflowError(yaml_problem("config/config.yaml"))


configfile: "config/config.yaml"


validate(config, "config/schema/config.schema.yaml")


include: "rules/common.smk"


# Operational settings travel to every job (cluster jobs too) in the environment, not in params.
envvars:
    *RUNTIME_ENVIRONMENT,


include: "rules/intake.smk"
include: "rules/interpret.smk"
include: "rules/moqui_input.smk"


# The GPU step: where Snakemake runs it (here or SLURM jobs), or over SSH (--profile remote).
if config["deployment"] == "remote":

    include: "rules/remote.smk"

else:

    include: "rules/simulate.smk"


include: "rules/rtdose.smk"
include: "rules/report.smk"
include: "rules/qa.smk"
include: "rules/fractions.smk"


report: "report/workflow.rst"


# Everything but the GPU step runs where Snakemake runs (the login node under --profile hpc).
localrules:
    all,
    intake,
    interpret,
    moqui_input,
    rtdose_beam,
    rtdose_plan,
    report_dose_map,
    report_beam_table,
    case_summary,
    qa_case,
    qa_trend,
    fraction_check,


rule all:
    default_target: True
    input:
        all_targets,
        qa_targets,
        fraction_targets,

# P1: validate a ready case and map its deliveries to plan beams (intake.json).
# A checkpoint: the beams to simulate are known only once the manifest exists.


checkpoint intake:
    input:
        case_files,
    output:
        processing("intake.json"),
    log:
        "logs/{case_id}/intake.log",
    conda:
        "../envs/mqi.yaml"
    params:
        python=PYTHON,
        case_dir=lambda wildcards: SCAN_DIR / wildcards.case_id,
        failure_record=lambda wildcards: intake_failure_record(wildcards.case_id),
        settings=settings_for(
            "application",
            "interpreter",
            "log_checks",
            "rooms",
            "monitor_range_factors",
        ),
    shell:
        "{params.python} -m mqi_communicator.intake --case={params.case_dir:q} --output {output:q}"
        " --failure-record {params.failure_record:q} --settings {params.settings:q} > {log:q} 2>&1"

# P1: validate a ready case and map its deliveries to plan beams (intake.json).
# The beams to simulate are the plan's treatment beams (common.smk: planned), known up front.


rule intake:
    output:
        processing("intake.json"),
    log:
        "logs/{case_id}/intake.log",
    params:
        python=PYTHON,
        case_dir=lambda wildcards: SCAN_DIR / wildcards.case_id,
        # Content, not mtime: a file replaced under an old timestamp changes this and reruns
        # intake and everything after it; a touched but identical file does not.
        content=case_content_digest,
        # `executables`: the engine decides what intake says of range shifters and which
        # modifiers it refuses (docs/beam-modifiers.md).
        settings=settings_for(
            "application",
            "executables",
            "interpreter",
            "log_checks",
            "rooms",
            "monitor_range_factors",
        ),
    shell:
        "{params.python} -m mqi_communicator.intake --case={params.case_dir:q} --output {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"

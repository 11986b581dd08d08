# Every delivered fraction's delivery check (docs/fractions.md): one append-only record per
# complete fraction, for a new case and for later fractions arriving in a finished one. The
# pending ones are known when the DAG is built (common.smk: FRACTIONS), so a dry run lists them.


rule fraction_check:
    input:
        fraction_inputs,
    output:
        processing("fractions/{fraction}.json"),
    log:
        "logs/{case_id}/fraction_{fraction}.log",
    params:
        python=PYTHON,
        case_dir=lambda wildcards: SCAN_DIR / wildcards.case_id,
        settings=settings_for("interpreter", "qa", "rooms", "monitor_range_factors"),
    shell:
        "{params.python} -m mqi_communicator.qa.fraction_records --case={params.case_dir:q}"
        " --fraction {wildcards.fraction} --output {output:q} --settings {params.settings:q}"
        " > {log:q} 2>&1"

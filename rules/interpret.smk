# P2: delivery logs (or plan spots) -> MOQUI CSVs in the mqi_interpreter layout.


rule interpret:
    input:
        manifest=processing("intake.json"),
    output:
        directory(processing("moqui_csv")),
    log:
        "logs/{case_id}/interpret.log",
    benchmark:
        "logs/{case_id}/interpret.benchmark.tsv"
    params:
        python=PYTHON,
        case_dir=lambda wildcards: SCAN_DIR / wildcards.case_id,
        settings=settings_for(
            "executables", "interpreter", "monitor_range_factors", "rooms"
        ),
    shell:
        "{params.python} -m mqi_communicator.interpret --logdir {params.case_dir:q} --manifest {input.manifest:q}"
        " --outputdir {output:q} --summary {output:q}/p2_summary.json --settings {params.settings:q} > {log:q} 2>&1"

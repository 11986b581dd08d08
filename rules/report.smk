# Report items for `snakemake --report`: dose map + profiles per beam, a beam table per case.


rule report_dose_map:
    input:
        rtdose=final_dicom("RD_{beam}.dcm"),
        manifest=processing("intake.json"),
    output:
        report(
            processing("report/dose_{beam}.png"),
            caption="../report/dose_map.rst",
            category="Dose maps",
            subcategory="{case_id}",
            labels={"case": "{case_id}", "beam": "{beam}"},
        ),
    log:
        "logs/{case_id}/report_dose_{beam}.log",
    params:
        python=PYTHON,
        title=lambda wildcards, input: (
            f"{wildcards.case_id} beam {wildcards.beam} ({dose_label(wildcards, input)})"
        ),
    shell:
        "{params.python} -m mqi_communicator.report figure --rtdose {input.rtdose:q} --title {params.title:q}"
        " --output {output:q} > {log:q} 2>&1"


rule report_beam_table:
    input:
        manifest=processing("intake.json"),
        records=beam_records,
        rtdoses=beam_rtdoses,
    output:
        report(
            processing("report/beams.csv"),
            caption="../report/beam_table.rst",
            category="Beams",
            labels={"case": "{case_id}"},
        ),
    log:
        "logs/{case_id}/report_beams.log",
    params:
        python=PYTHON,
    shell:
        "{params.python} -m mqi_communicator.report table --records {input.records:q} --rtdoses {input.rtdoses:q}"
        " --manifest {input.manifest:q} --output {output:q} > {log:q} 2>&1"


rule case_summary:
    input:
        manifest=processing("intake.json"),
        records=beam_records,
        rtdoses=beam_rtdoses,
        plan_dose=plan_sum_dose,
        figures=beam_figures,
        table=processing("report/beams.csv"),
        qa=processing("qa/qa.json"),
    output:
        processing("case_summary.json"),
    log:
        "logs/{case_id}/case_summary.log",
    params:
        python=PYTHON,
        plan_dose=plan_dose_arg,
    shell:
        "{params.python} -m mqi_communicator.report summary --case={wildcards.case_id:q} --manifest {input.manifest:q}"
        " --records {input.records:q} --rtdoses {input.rtdoses:q} {params.plan_dose} --qa {input.qa:q}"
        " --output {output:q} > {log:q} 2>&1"

# Patient QA (docs/design.md#qa): per case the dose and delivery verdicts, qa.json and the QA sheet;
# across cases the pass-rate trend per room.


rule qa_case:
    input:
        manifest=processing("intake.json"),
        rtdoses=beam_rtdoses,
    output:
        json=processing("qa/qa.json"),
        sheet=report(
            processing("qa/qa_sheet.html"),
            caption="../report/qa_sheet.rst",
            category="QA sheets",
            labels={"case": "{case_id}"},
        ),
        # The sheet's content on A4 pages, drawn by the same process from the same figures
        # (docs/qa-report-pdf.md). A finished case never enters the DAG again, so cases finished
        # before this output existed are not re-run for it.
        pdf=processing("qa/qa_report.pdf"),
    log:
        "logs/{case_id}/qa.log",
    params:
        python=PYTHON,
        settings=settings_for("qa", "rooms", "monitor_range_factors", "calibration"),
        engine=ENGINE_LABEL,
        calibration=calibration_json,
    shell:
        "{params.python} -m mqi_communicator.qa.run --manifest {input.manifest:q} --rtdoses {input.rtdoses:q}"
        " --settings {params.settings:q} --engine {params.engine:q} --calibration {params.calibration:q}"
        " --json {output.json:q}"
        " --sheet {output.sheet:q} --pdf {output.pdf:q} > {log:q} 2>&1"


# Runs when a case of this run has its QA: adds this run's cases to the ledger of every assessed beam
# (built once from every case's qa.json when missing) and draws the trend from it, so its cost does
# not grow with the number of finished cases. Points are stratified and ordered by the delivery
# times of each case's intake.json, beside its qa/ folder (docs/alerts-and-trend.md).
rule qa_trend:
    input:
        qa_case_results,
    output:
        figure=report(
            "results/qa_trend.png",
            caption="../report/qa_trend.rst",
            category="QA trend",
        ),
        json="results/qa_trend.json",
    log:
        "logs/qa_trend.log",
    params:
        python=PYTHON,
        min_cases=config["qa"]["trend"]["min_cases"],
        window=config["qa"]["trend"]["window"],
        ledger="results/qa_history.jsonl",
        history=processing("qa/qa.json", "*"),
    shell:
        "{params.python} -m mqi_communicator.qa.trend --qa {input:q} --ledger {params.ledger:q}"
        " --history {params.history:q}"
        " --min-cases {params.min_cases} --window {params.window}"
        " --figure {output.figure:q} --json {output.json:q} > {log:q} 2>&1"

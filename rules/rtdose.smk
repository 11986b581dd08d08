# P3: raw dose -> DICOM RT Dose, per beam and as a plan sum.


# RD_PLAN.dcm is the plan sum, never a beam's file.
ruleorder: rtdose_plan > rtdose_beam


rule rtdose_beam:
    input:
        raw=raw_output("{beam}_Dose.raw"),
        p2=processing("moqui_csv"),
        manifest=processing("intake.json"),
    output:
        final_dicom("RD_{beam}.dcm"),
    log:
        "logs/{case_id}/rtdose_{beam}.log",
    params:
        python=PYTHON,
        plan=plan_copy,
        beam_number=beam_number,
        dose_type=config["simulation"]["dose_type"],
        calibration=rtdose_calibration_args,
        engine_label=dose_label,
    shell:
        "{params.python} -m mqi_communicator.rtdose --input {input.raw:q} --plan {params.plan:q}"
        " --beam-number {params.beam_number} --dosetype {params.dose_type} --engine-label {params.engine_label:q}"
        " {params.calibration} --output $(dirname {output:q}) > {log:q} 2>&1"


rule rtdose_plan:
    input:
        raws=beam_raw_doses,
        p2=processing("moqui_csv"),
        manifest=processing("intake.json"),
    output:
        final_dicom("RD_PLAN.dcm"),
    log:
        "logs/{case_id}/rtdose_plan.log",
    params:
        python=PYTHON,
        plan=plan_copy,
        dose_type=config["simulation"]["dose_type"],
        calibration=rtdose_calibration_args,
        engine_label=dose_label,
    shell:
        "{params.python} -m mqi_communicator.rtdose --sum {input.raws:q} --plan {params.plan:q}"
        " --dosetype {params.dose_type} --engine-label {params.engine_label:q}"
        " {params.calibration} --output $(dirname {output:q}) > {log:q} 2>&1"

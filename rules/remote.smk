# The remote deployment's GPU step: stage in (SFTP) -> sbatch over SSH per beam -> stage out.
# Produces the same raw dose and run record as rules/simulate.smk, so P3 and the report are shared.
# All of it runs on the workstation: the cluster is reached over SSH, not through an executor.


localrules:
    stage_in,
    remote_simulate,
    stage_out,


rule stage_in:
    input:
        p2=processing("moqui_csv"),
        parameters=beam_parameter_files,
    output:
        processing("remote/stage_in.json"),
    log:
        "logs/{case_id}/stage_in.log",
    params:
        python=PYTHON,
        processing=lambda wildcards: processing("", wildcards.case_id),
        beams=beam_options,
        settings=settings_for("hpc_connection", "paths"),
    shell:
        "{params.python} -m mqi_communicator.remote.stage stage-in --case={wildcards.case_id:q}"
        " --processing {params.processing:q} {params.beams} --report {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule remote_simulate:
    input:
        staged=processing("remote/stage_in.json"),
    output:
        raw_output("{beam}.remote.json"),
    log:
        # The remote engine's log is appended here when the job ends.
        "logs/{case_id}/simulate_{beam}.log",
    resources:
        remote_jobs=1,
    params:
        python=PYTHON,
        # Kept outside the outputs so a failed or killed run still knows its job (re-attach).
        job_record=lambda wildcards: raw_output(
            f"{wildcards.beam}.job.json", wildcards.case_id
        ),
        settings=settings_for(
            "hpc_connection", "paths", "remote_slurm", "simulation", "application"
        ),
    shell:
        "{params.python} -m mqi_communicator.remote.job --staged {input.staged:q} --beam={wildcards.beam:q}"
        " --record {params.job_record:q} --result {output:q} --log {log:q} --settings {params.settings:q}"
        # Its progress (submitted, re-attached, the result) in its log, not on the console.
        " >> {log:q} 2>&1"


rule stage_out:
    input:
        raw_output("{beam}.remote.json"),
    output:
        raw=raw_output("{beam}_Dose.raw"),
        record=raw_output("{beam}.simulate.json"),
    log:
        "logs/{case_id}/stage_out_{beam}.log",
    params:
        python=PYTHON,
        settings=settings_for("hpc_connection"),
    shell:
        "{params.python} -m mqi_communicator.remote.stage stage-out --result {input:q} --output-raw {output.raw:q}"
        " --record {output.record:q} --settings {params.settings:q} > {log:q} 2>&1"

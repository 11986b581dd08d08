# One MOQUI parameter file per treatment beam, with a logFilePath laid out for the engine build.


rule moqui_input:
    input:
        manifest=processing("intake.json"),
        p2=processing("moqui_csv"),
    output:
        # The beam's logFilePath (moqui/{beam}/log) is written too but deliberately not declared:
        # Snakemake would put a .snakemake_timestamp into a directory() output, and the engine
        # picks the beam's CSV folder by its sorted position among *all* entries.
        parameters=processing("moqui/{beam}/moqui_tps_{beam}.in"),
    log:
        "logs/{case_id}/moqui_input_{beam}.log",
    params:
        python=PYTHON,
        logdir=lambda wildcards: processing(
            f"moqui/{wildcards.beam}/log", wildcards.case_id
        ),
        output_dir=lambda wildcards: os.path.abspath(
            raw_output(f"{wildcards.beam}.moqui", wildcards.case_id)
        ),
        settings=settings_for("simulation"),
    shell:
        "{params.python} -m mqi_communicator.moqui_input --manifest {input.manifest:q} --p2 {input.p2:q}"
        " --beam={wildcards.beam:q} --parameters {output.parameters:q} --logdir {params.logdir:q}"
        " --output-dir {params.output_dir:q} --settings {params.settings:q} > {log:q} 2>&1"

# The GPU step: one engine run per beam (`cd <moqui_dir> && <tps_env> <beam.in>`), checked.


rule simulate:
    input:
        parameters=processing("moqui/{beam}/moqui_tps_{beam}.in"),
    output:
        raw=raw_output("{beam}_Dose.raw"),
        record=raw_output("{beam}.simulate.json"),
    log:
        # The engine's own log (stdout and stderr), kept as the rule's log.
        "logs/{case_id}/simulate_{beam}.log",
    benchmark:
        "logs/{case_id}/simulate_{beam}.benchmark.tsv"
    resources:
        gpu=1,
        runtime=int(config["simulation"]["timeout_seconds"] // 60) + 5,
    params:
        python=PYTHON,
        tps_env=config["executables"]["moqui"],
    # Timeout, GPUs and lock folder are operational: no result setting of the step (--settings
    # '{}'), they come with MQI_RUNTIME_SETTINGS, and the engine's folder in MQI_MOQUI_DIR
    # (common.smk, RUNTIME_ENVIRONMENT), so changing them reruns nothing.
    shell:
        "{params.python} -m mqi_communicator.simulate --input {input.parameters:q} --tps-env {params.tps_env:q}"
        ' --moqui-dir "$MQI_MOQUI_DIR" --log {log:q} --output-raw {output.raw:q} --record {output.record:q}'
        " --settings '{{}}'"
        # The step's own lines (its result, or why it failed) after the engine's, not on the console.
        " >> {log:q} 2>&1"

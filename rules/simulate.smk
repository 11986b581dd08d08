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
    conda:
        "../envs/mqi.yaml"
    resources:
        gpu=1,
        runtime=int(config["simulation"]["timeout_seconds"] // 60) + 5,
    params:
        python=PYTHON,
        tps_env=config["executables"]["moqui"],
        moqui_dir=config["paths"]["local"]["moqui_dir"],
        timeout=config["simulation"]["timeout_seconds"],
        gpu_devices=",".join(str(d) for d in config["simulation"]["gpu_devices"]),
        gpu_lock_dir=config["simulation"]["gpu_lock_dir"],
    shell:
        "{params.python} -m mqi_communicator.simulate --input {input.parameters:q} --tps-env {params.tps_env:q}"
        " --moqui-dir {params.moqui_dir:q} --log {log:q} --output-raw {output.raw:q} --record {output.record:q}"
        " --timeout {params.timeout} --gpu-devices {params.gpu_devices} --gpu-lock-dir {params.gpu_lock_dir:q}"

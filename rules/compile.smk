# Stage 5: compiled artifacts. vamc build configs and `vamc compile` (VACC),
# and the portable AOTInductor packages every machine builds and verifies.


rule vamc_config:
    input:
        code=code("vamc_config"),
        patched="results/{model}/patched/MANIFEST.json",
        verified=verified_checkpoint(),
        dataset=vamc_config_dataset_manifest,
    output:
        "results/{model}/vamc/{dtype}.yaml",
    log:
        "logs/{model}/vamc-config-{dtype}.log",
    benchmark:
        "benchmarks/{model}/vamc-config-{dtype}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["vamc_config"].threads
    resources:
        **NEEDS["vamc_config"].resources(),
    params:
        settings=vamc_config_settings,
        calibration=vamc_config_calibration_arguments,
    shell:
        "python3 -m workflow_scripts.stages.vamc_config --model {wildcards.model:q} --dtype {wildcards.dtype}"
        " --patched {input.patched:q} --settings {params.settings:q} {params.calibration}"
        " --workspace results/{wildcards.model:q}/vacc/{wildcards.dtype} --output {output:q} > {log:q} 2>&1"


rule vacc_compile:
    input:
        code=code("vacc_compile"),
        config="results/{model}/vamc/{dtype}.yaml",
        patched="results/{model}/patched/MANIFEST.json",
        verified=verified_checkpoint(),
    output:
        "results/{model}/vacc/{dtype}/MANIFEST.json",
    log:
        "logs/{model}/vacc-compile-{dtype}.log",
    benchmark:
        "benchmarks/{model}/vacc-compile-{dtype}.tsv"
    conda:
        "../envs/vamc.yaml"
    threads: NEEDS["vacc_compile"].threads
    resources:
        **NEEDS["vacc_compile"].resources(),
    shell:
        "python3 -m workflow_scripts.stages.vacc_compile --model {wildcards.model:q} --config {input.config:q}"
        " --patched {input.patched:q} --manifest {output:q} > {log:q} 2>&1"


rule aoti_compile:
    input:
        code=code("aoti_compile"),
        patched="results/{model}/patched/MANIFEST.json",
        verified=verified_checkpoint(),
        checkpoint=aoti_compile_checkpoint_manifest,
    output:
        "results/{model}/aoti/{variant}/MANIFEST.json",
    log:
        "logs/{model}/aoti-{variant}.log",
    benchmark:
        "benchmarks/{model}/aoti-{variant}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["aoti_compile"].threads
    resources:
        **NEEDS["aoti_compile"].resources(),
    params:
        settings=aoti_compile_settings,
        verify=aoti_compile_verify_settings,
    shell:
        "python3 -m workflow_scripts.stages.aoti_compile --model {wildcards.model:q} --variant {wildcards.variant}"
        " --patched {input.patched:q} --checkpoint {input.checkpoint:q}"
        " --settings {params.settings:q} --verify {params.verify:q}"
        " --manifest {output:q} > {log:q} 2>&1"

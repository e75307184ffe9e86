# Stage 2: the patched checkpoint that vamc loads, and its check against upstream Mistral.


rule patch:
    input:
        code=code("patch"),
        source="resources/models/{model}/MANIFEST.json",
    output:
        "results/{model}/patched/MANIFEST.json",
    log:
        "logs/{model}/patch.log",
    benchmark:
        "benchmarks/{model}/patch.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["patch"].threads
    resources:
        **NEEDS["patch"].resources(),
    params:
        settings=model_settings("patch"),
    shell:
        "python3 -m workflow_scripts.stages.patch --model {wildcards.model:q} --source {input.source:q}"
        " --manifest {output:q} --settings {params.settings:q} > {log:q} 2>&1"


rule verify:
    input:
        code=code("verify"),
        patched="results/{model}/patched/MANIFEST.json",
        upstream="resources/models/{model}/MANIFEST.json",
    output:
        "results/{model}/patched/verify.json",
    log:
        "logs/{model}/verify.log",
    benchmark:
        "benchmarks/{model}/verify.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["verify"].threads
    resources:
        **NEEDS["verify"].resources(),
    params:
        settings=model_settings("verify"),
    shell:
        "python3 -m workflow_scripts.stages.verify --model {wildcards.model:q} --patched {input.patched:q}"
        " --upstream {input.upstream:q} --output {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"

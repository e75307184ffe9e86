# Stage 1: the checkpoint of each model under resources/models/{model}/.
# A checkpoint: the calibration shards a model needs are keyed by its
# tokenizer's fingerprint, which is known only once the files are here.


checkpoint download:
    input:
        code=lambda wildcards: code(download_stage(wildcards.model)),
        local=download_source_files,
    output:
        "resources/models/{model}/MANIFEST.json",
    log:
        "logs/{model}/download.log",
    benchmark:
        "benchmarks/{model}/download.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["download"].threads
    resources:
        **NEEDS["download"].resources(),
    params:
        stage=lambda wildcards: download_stage(wildcards.model),
        source=model_settings("source"),
    shell:
        "python3 -m workflow_scripts.stages.{params.stage} --model {wildcards.model:q}"
        " --source {params.source:q} --manifest {output:q} > {log:q} 2>&1"

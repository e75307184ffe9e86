# Stage 3: calibration datasets, fetched once, tokenized once per distinct tokenizer.
import json


rule fetch_dataset:
    input:
        code=lambda wildcards: code(fetch_dataset_stage(wildcards.dataset)),
    output:
        "resources/datasets/{dataset}/MANIFEST.json",
    log:
        "logs/datasets/{dataset}/fetch.log",
    benchmark:
        "benchmarks/datasets/{dataset}/fetch.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["fetch_dataset"].threads
    resources:
        **NEEDS["fetch_dataset"].resources(),
    params:
        stage=lambda wildcards: fetch_dataset_stage(wildcards.dataset),
        source=lambda wildcards: json.dumps(
            DATASETS[wildcards.dataset]["source"], sort_keys=True
        ),
        format=lambda wildcards: DATASETS[wildcards.dataset]["format"],
    shell:
        "python3 -m workflow_scripts.stages.{params.stage} --dataset {wildcards.dataset}"
        " --format {params.format} --source {params.source:q} --manifest {output:q} > {log:q} 2>&1"


rule tokenizer_store:
    input:
        code=code("tokenizer_store"),
        source=tokenizer_store_source,
    output:
        "resources/tokenizers/{tokenizer}/tokenizer.json",
    log:
        "logs/tokenizers/{tokenizer}.log",
    benchmark:
        "benchmarks/tokenizers/{tokenizer}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["tokenizer_store"].threads
    resources:
        **NEEDS["tokenizer_store"].resources(),
    shell:
        "python3 -m workflow_scripts.stages.tokenizer_store --fingerprint {wildcards.tokenizer}"
        " --source {input.source:q} --output {output:q} > {log:q} 2>&1"


rule calibration_shard:
    input:
        code=code("calibration_shard"),
        dataset="resources/datasets/{dataset}/MANIFEST.json",
        tokenizer="resources/tokenizers/{tokenizer}/tokenizer.json",
    output:
        shard="results/calibration/{tokenizer}/{dataset}.safetensors",
        record="results/calibration/{tokenizer}/{dataset}.json",
    log:
        "logs/calibration/{tokenizer}/{dataset}.log",
    benchmark:
        "benchmarks/calibration/{tokenizer}/{dataset}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["calibration_shard"].threads
    resources:
        **NEEDS["calibration_shard"].resources(),
    params:
        settings=calibration_shard_settings,
        format=lambda wildcards: DATASETS[wildcards.dataset]["format"],
    shell:
        "python3 -m workflow_scripts.stages.calibration_shard --dataset {wildcards.dataset} --format {params.format}"
        " --files {input.dataset:q} --tokenizer {input.tokenizer:q}"
        " --fingerprint {wildcards.tokenizer} --settings {params.settings:q}"
        " --shard {output.shard:q} --record {output.record:q} > {log:q} 2>&1"


# perplexity windows from the validation file of a c4-format dataset (c4, python-docs, ...)
rule c4_evaluation_windows:
    input:
        code=code("c4_evaluation_windows"),
        dataset="resources/datasets/{dataset}/MANIFEST.json",
        tokenizer="resources/tokenizers/{tokenizer}/tokenizer.json",
    output:
        windows="results/evaluation-sets/{tokenizer}/{dataset}-validation.safetensors",
        record="results/evaluation-sets/{tokenizer}/{dataset}-validation.json",
    log:
        "logs/evaluation-sets/{tokenizer}/{dataset}-validation.log",
    benchmark:
        "benchmarks/evaluation-sets/{tokenizer}/{dataset}-validation.tsv"
    wildcard_constraints:
        dataset="|".join(c4_format_datasets()),
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["c4_evaluation_windows"].threads
    resources:
        **NEEDS["c4_evaluation_windows"].resources(),
    params:
        settings=c4_evaluation_windows_settings,
    shell:
        "python3 -m workflow_scripts.stages.c4_evaluation_windows --files {input.dataset:q}"
        " --tokenizer {input.tokenizer:q} --fingerprint {wildcards.tokenizer}"
        " --settings {params.settings:q} --output {output.windows:q} --record {output.record:q}"
        " > {log:q} 2>&1"


rule ceval_evaluation_set:
    input:
        code=code("ceval_evaluation_set"),
        dataset="resources/datasets/ceval/MANIFEST.json",
        tokenizer="resources/tokenizers/{tokenizer}/tokenizer.json",
    output:
        "results/evaluation-sets/{tokenizer}/ceval.json",
    log:
        "logs/evaluation-sets/{tokenizer}/ceval.log",
    benchmark:
        "benchmarks/evaluation-sets/{tokenizer}/ceval.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["ceval_evaluation_set"].threads
    resources:
        **NEEDS["ceval_evaluation_set"].resources(),
    params:
        settings=json.dumps(config["evaluation"]["ceval"], sort_keys=True),
    shell:
        "python3 -m workflow_scripts.stages.ceval_evaluation_set --files {input.dataset:q}"
        " --tokenizer {input.tokenizer:q} --fingerprint {wildcards.tokenizer}"
        " --settings {params.settings:q} --output {output:q} > {log:q} 2>&1"

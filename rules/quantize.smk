# Stage 4: int8 checkpoints, streamed from the patched one with bounded memory.


rule quantize:
    input:
        code=code("quantize"),
        patched="results/{model}/patched/MANIFEST.json",
    output:
        "results/{model}/quantized/{scheme}/MANIFEST.json",
    log:
        "logs/{model}/quantize-{scheme}.log",
    benchmark:
        "benchmarks/{model}/quantize-{scheme}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: 2
    resources:
        # a few chunks and the largest tensor's pages, never the model
        mem_mb=2500,
        runtime=60,
    params:
        settings=lambda wildcards: json.dumps(
            MODELS[wildcards.model]["quantize"][wildcards.scheme], sort_keys=True
        ),
    shell:
        "python3 -m workflow_scripts.quantize --model {wildcards.model:q} --scheme {wildcards.scheme}"
        " --patched results/{wildcards.model:q}/patched --manifest {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"

# Stage 4: int8 checkpoints, streamed from the patched one with bounded memory, and their
# compressed-tensors exports for stock transformers and vLLM.


rule quantize:
    input:
        code=code("quantize"),
        patched="results/{model}/patched/MANIFEST.json",
        verified=verified_checkpoint(),
    output:
        "results/{model}/quantized/{scheme}/MANIFEST.json",
    log:
        "logs/{model}/quantize-{scheme}.log",
    benchmark:
        "benchmarks/{model}/quantize-{scheme}.tsv"
    wildcard_constraints:
        scheme="rtn-int8",
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["quantize"].threads
    resources:
        **NEEDS["quantize"].resources(),
    params:
        settings=model_settings("quantize", "{scheme}"),
    shell:
        "python3 -m workflow_scripts.stages.quantize --model {wildcards.model:q} --scheme {wildcards.scheme}"
        " --patched {input.patched:q} --manifest {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule quantize_gptq:
    input:
        code=code("quantize_gptq"),
        patched="results/{model}/patched/MANIFEST.json",
        verified=verified_checkpoint(),
        calibration=quantize_gptq_calibration,
    output:
        "results/{model}/quantized/gptq-int8/MANIFEST.json",
    log:
        "logs/{model}/quantize-gptq-int8.log",
    benchmark:
        "benchmarks/{model}/quantize-gptq-int8.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["quantize_gptq"].threads
    resources:
        **NEEDS["quantize_gptq"].resources(),
    params:
        settings=model_settings("quantize", "gptq-int8"),
    shell:
        "python3 -m workflow_scripts.stages.quantize_gptq --model {wildcards.model:q}"
        " --patched {input.patched:q} --calibration {input.calibration:q}"
        " --manifest {output:q} --settings {params.settings:q} > {log:q} 2>&1"


rule export_compressed_tensors:
    input:
        code=code("export_compressed_tensors"),
        int8="results/{model}/quantized/{scheme}/MANIFEST.json",
    output:
        "results/{model}/quantized/{scheme}-ct/MANIFEST.json",
    log:
        "logs/{model}/export-{scheme}-ct.log",
    benchmark:
        "benchmarks/{model}/export-{scheme}-ct.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["export_compressed_tensors"].threads
    resources:
        **NEEDS["export_compressed_tensors"].resources(),
    shell:
        "python3 -m workflow_scripts.stages.export_compressed_tensors --model {wildcards.model:q}"
        " --int8 {input.int8:q} --manifest {output:q} > {log:q} 2>&1"

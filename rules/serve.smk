# Stage 7: serving. Each benchmarked variant served over the OpenAI-compatible API on a free port of the
# job's host (by our server, or by vastgenx for a VACC build), swept as the vendor benchmarks its VACC
# servers, and stopped; the report plots the sweep.


rule serve_benchmark:
    input:
        code=code("serve_benchmark"),
        served=serve_benchmark_input,
    output:
        report(
            "results/{model}/bench/{served}.json",
            category="{model}",
            subcategory="serving",
        ),
    log:
        "logs/{model}/serve-benchmark-{served}.log",
    benchmark:
        "benchmarks/{model}/serve-benchmark-{served}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["serve_benchmark"].threads
    resources:
        **NEEDS["serve_benchmark"].resources(gpu=serve_benchmark_gpus),
    params:
        settings=serve_benchmark_settings,
        server=serve_benchmark_server,
        folder=lambda wildcards, input: os.path.dirname(input.served),
    shell:
        "python3 -m workflow_scripts.stages.serve_benchmark --model {wildcards.model:q}"
        " --variant {wildcards.served} --folder {params.folder:q} --settings {params.settings:q}"
        " {params.server} --output {output:q} > {log:q} 2>&1"


rule serving_plot:
    input:
        code=code("report"),
        benchmarks=lambda wildcards: model_benchmarks(wildcards.model),
    output:
        report(
            "results/report/{model}/serving.png",
            category="{model}",
            subcategory="plots",
            caption="report/serving.rst",
        ),
    log:
        "logs/{model}/serving-plot.log",
    benchmark:
        "benchmarks/{model}/serving-plot.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: SMALL_JOB.threads
    resources:
        **SMALL_JOB.resources(),
    shell:
        "python3 -m workflow_scripts.stages.report serving --bench {input.benchmarks:q}"
        " --output {output:q} > {log:q} 2>&1"

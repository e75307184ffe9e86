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
        **NEEDS["serve_benchmark"].resources(),
    params:
        settings=serve_benchmark_settings,
        server=serve_benchmark_server,
    shell:
        "python3 -m workflow_scripts.stages.serve_benchmark --model {wildcards.model:q}"
        " --variant {wildcards.served} --served {input.served:q} --settings {params.settings:q}"
        " {params.server} --output {output:q} > {log:q} 2>&1"


rule serving_plot:
    input:
        code=code("serving_plot"),
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
    threads: NEEDS["serving_plot"].threads
    resources:
        **NEEDS["serving_plot"].resources(),
    shell:
        "python3 -m workflow_scripts.stages.serving_plot --bench {input.benchmarks:q}"
        " --output {output:q} > {log:q} 2>&1"

# Stage 6: every variant evaluated, gated, summarised and plotted for the report.
import json


rule evaluate:
    input:
        code=code("evaluate"),
        patched="results/{model}/patched/MANIFEST.json",
        verified=verified_checkpoint(),
        checkpoint=evaluate_checkpoint_manifest,
        windows=evaluate_windows,
        ceval=lambda wildcards: evaluate_set(wildcards, "ceval.json"),
    output:
        report(
            "results/{model}/eval/{evaluation}.json",
            category="{model}",
            subcategory="evaluations",
        ),
    log:
        "logs/{model}/evaluate-{evaluation}.log",
    benchmark:
        "benchmarks/{model}/evaluate-{evaluation}.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["evaluate"].threads
    resources:
        **NEEDS["evaluate"].resources(),
    params:
        settings=evaluate_settings,
    shell:
        "python3 -m workflow_scripts.stages.evaluate --model {wildcards.model:q} --variant {wildcards.evaluation}"
        " --patched {input.patched:q} --checkpoint {input.checkpoint:q}"
        " --windows {input.windows:q} --ceval {input.ceval:q} --settings {params.settings:q}"
        " --output {output:q} > {log:q} 2>&1"


rule gate:
    input:
        code=code("gate"),
        evaluations=lambda wildcards: model_evaluations(wildcards.model),
    output:
        report("results/{model}/gate.json", category="{model}", subcategory="gates"),
    log:
        "logs/{model}/gate.log",
    benchmark:
        "benchmarks/{model}/gate.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["gate"].threads
    resources:
        **NEEDS["gate"].resources(),
    params:
        settings=model_settings("gates"),
    shell:
        "python3 -m workflow_scripts.stages.gate --model {wildcards.model:q} --evaluations {input.evaluations:q}"
        " --settings {params.settings:q} --output {output:q} > {log:q} 2>&1"


rule plots:
    input:
        code=code("plots"),
        evaluations=lambda wildcards: model_evaluations(wildcards.model),
        gptq=lambda wildcards: report_gptq_manifest(wildcards.model),
        # every other job of the model first, so that its benchmark files are all there
        built=lambda wildcards: model_builds(wildcards.model),
    output:
        report(
            "results/report/{model}/metrics.png",
            category="{model}",
            subcategory="plots",
            caption="report/metrics.rst",
        ),
        report(
            "results/report/{model}/stages.png",
            category="{model}",
            subcategory="plots",
            caption="report/stages.rst",
        ),
        report(
            "results/report/{model}/quantization-error.png",
            category="{model}",
            subcategory="plots",
            caption="report/quantization-error.rst",
        ),
    log:
        "logs/{model}/plots.log",
    benchmark:
        "benchmarks/{model}/plots.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["plots"].threads
    resources:
        **NEEDS["plots"].resources(),
    params:
        gptq=lambda wildcards, input: f"--gptq {input.gptq}" if input.gptq else "",
    shell:
        "python3 -m workflow_scripts.stages.plots"
        " --evaluations {input.evaluations:q} {params.gptq} --benchmarks benchmarks/{wildcards.model:q}"
        " --output results/report/{wildcards.model:q} > {log:q} 2>&1"


rule summary:
    input:
        code=code("summary"),
        evaluations=[
            path for model in config["targets"] for path in model_evaluations(model)
        ],
        gptq=[report_gptq_manifest(model) for model in config["targets"]],
        benchmarks=[
            path for model in config["targets"] for path in model_benchmarks(model)
        ],
    output:
        markdown="results/summary.md",
        html=report(
            "results/report/summary.html",
            category="Summary",
            caption="report/summary.rst",
        ),
    log:
        "logs/summary.log",
    benchmark:
        "benchmarks/summary.tsv"
    conda:
        "../envs/workflow.yaml"
    threads: NEEDS["summary"].threads
    resources:
        **NEEDS["summary"].resources(),
    params:
        evaluations=json.dumps(
            {model: model_evaluations(model) for model in config["targets"]}
        ),
        gates=json.dumps({model: MODELS[model]["gates"] for model in config["targets"]}),
        gptq=json.dumps(
            {model: report_gptq_manifest(model) or None for model in config["targets"]}
        ),
        benchmarks=json.dumps(
            {model: model_benchmarks(model) for model in config["targets"]}
        ),
    shell:
        "python3 -m workflow_scripts.stages.summary --evaluations {params.evaluations:q}"
        " --gates {params.gates:q} --gptq {params.gptq:q} --bench {params.benchmarks:q}"
        " --markdown {output.markdown:q}"
        " --html {output.html:q} > {log:q} 2>&1"

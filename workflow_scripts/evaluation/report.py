"""The run's summary and each model's plots (stage 6, report).

* summary: one row per model and variant (backend, c4 perplexity and its change
  against float eager, KL divergence, top-1 agreement, ceval accuracy) and the
  gates' verdicts; each variant's greedy completions of the fixed prompts;
  GPTQ's and RTN's held-out output error layer by layer; the serving
  benchmark's cases (:mod:`workflow_scripts.serving.bench_client` records); as
  Markdown for a terminal and as HTML for ``snakemake --report``;
* plots (matplotlib, PNG): per-layer quantization error of RTN and GPTQ from
  the GPTQ manifest; perplexity and KL by variant; wall time and peak memory
  of every stage from the rules' ``benchmark:`` files; output tokens per
  second and time to first token by concurrency from the serving benchmark.
"""

import csv
import html
import json
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path, atomic_write_text, read_json
from workflow_scripts.evaluation.gates import GateSettings, check_variants, describe, perplexity_increase

COLUMNS = (
    "model",
    "variant",
    "backend",
    "perplexity",
    "vs float, same positions",
    "KL (nats)",
    "top-1 agreement",
    "ceval accuracy",
    "gates",
)


def gate_settings_by_model(text):
    """``{model: GateSettings}`` from the JSON of the summary's ``--gates``."""
    return {model: GateSettings.of(values, f"models.{model}.gates") for model, values in json.loads(text).items()}


def number(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}g}"


def summary_rows(model, evaluations, gate_settings):
    """The table rows of one model; ``evaluations`` maps variant names to evaluation records."""
    checks = check_variants(evaluations, gate_settings)
    rows = []
    for variant, record in sorted(evaluations.items(), key=lambda item: (item[0] != "float", item[0])):
        c4, ceval = record["c4"], record["ceval"]
        mine = [check for check in checks if check["variant"] == variant]
        change = perplexity_increase(c4)
        verdict = (
            "reference"
            if variant == "float"
            else "pass"
            if all(c["passed"] for c in mine)
            else "FAIL: " + "; ".join(describe(c) for c in mine if not c["passed"])
        )
        rows.append(
            (
                model,
                variant,
                record["backend"],
                number(c4["perplexity"], 6),
                "" if variant == "float" else ("n/a" if change is None else f"{100 * change:+.3f}%"),
                number(c4.get("kl_divergence"), 3),
                number(c4.get("top1_agreement")),
                f"{number(ceval['accuracy'], 3)} ({ceval['questions']} q)",
                verdict,
            )
        )
    return rows


def generation_rows(model, evaluations):
    """One row per prompt and variant: what each variant completes greedily with its own runtime."""
    rows = []
    for variant, record in sorted(evaluations.items(), key=lambda item: (item[0] != "float", item[0])):
        for sample in record.get("generations", []):
            rows.append((model, sample["prompt"], variant, sample["completion"]))
    return rows


def layer_error_rows(model, manifest):
    """GPTQ's and RTN's held-out relative output error, layer by layer, and their ratio."""
    layers = read_json(manifest, what="GPTQ manifest")["layers"]
    rows = []
    for index in sorted(layers, key=int):
        errors = layers[index]["heldout_output_error"]
        rows.append(
            (
                model,
                index,
                f"{errors['rtn']:.4g}",
                f"{errors['gptq']:.4g}",
                f"{errors['gptq'] / errors['rtn']:.3f}" if errors["rtn"] else "n/a",
            )
        )
    return rows


BENCH_COLUMNS = (
    "model",
    "variant",
    "input tokens",
    "output tokens",
    "concurrency",
    "completed",
    "failed",
    "TTFT p50 (ms)",
    "TTFT p95 (ms)",
    "TPOT p50 (ms)",
    "TPOT p95 (ms)",
    "output tokens/s",
    "requests/s",
)


def milliseconds(seconds):
    return "n/a" if seconds is None else f"{1000 * seconds:.1f}"


def rate(value):
    return "n/a" if value is None else f"{value:.2f}"


def read_bench(path):
    """``(variant, record)`` of a serving benchmark record; a record without a variant label is named by its
    file."""
    record = read_json(path, what="serving benchmark")
    for key in ("cases", "skipped"):
        if not isinstance(record.get(key), list):
            raise InputError(f"serving benchmark {path} has no list {key!r}")
    return record.get("variant") or Path(path).stem, record


def bench_rows(model, paths):
    """One row per case that ran, and ``(variant, cases skipped)`` for each record that skipped some."""
    rows, skipped = [], []
    for path in paths:
        variant, record = read_bench(path)
        for case in record["cases"]:
            rows.append(
                (
                    model,
                    variant,
                    case["input_tokens"],
                    case["output_tokens"],
                    case["concurrency"],
                    f"{case['completed']}/{case['requests']}",
                    case["failed"],
                    milliseconds(case["ttft_s"]["p50"]),
                    milliseconds(case["ttft_s"]["p95"]),
                    milliseconds(case["tpot_s"]["p50"]),
                    milliseconds(case["tpot_s"]["p95"]),
                    rate(case["output_tokens_per_s"]),
                    rate(case["requests_per_s"]),
                )
            )
        if record["skipped"]:
            skipped.append(f"{model} {variant}: {len(record['skipped'])}")
    return rows, skipped


SECTIONS = (
    (
        "summary",
        "Variant summary",
        COLUMNS,
        "Perplexity on every position of the validation windows of each model's evaluate.dataset (c4 format), "
        "eager and compiled alike; KL divergence and top-1 agreement of the next-token distributions against the "
        "float eager model on the same positions; ceval accuracy from the answer letters' logits.",
    ),
    (
        "generations",
        "Greedy generations",
        ("model", "prompt", "variant", "completion"),
        "Each variant completes the model's fixed prompts greedily with its own runtime (compiled variants through "
        "their packages).",
    ),
    (
        "layers",
        "GPTQ vs RTN, held-out layer output error",
        ("model", "layer", "RTN", "GPTQ", "GPTQ / RTN"),
        "Relative output error of each decoder layer on calibration samples that never entered a Hessian.",
    ),
    (
        "bench",
        "Serving benchmark",
        BENCH_COLUMNS,
        "Each variant served over the OpenAI-compatible API and swept as VastAI benchmarks its VACC servers: "
        "streamed completions of exactly the output tokens asked (ignore_eos) for prompts of exactly the input "
        "tokens, at each concurrency. TTFT: time to the first token; TPOT: time per further output token; output "
        "tokens and completed requests per second over the case's wall time. Cases longer than a variant's "
        "compiled prompt length or output budget are skipped, as the vendor skips them.",
    ),
)


def markdown_table(columns, rows):
    def cell(value):
        return str(value).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(table_id, columns, rows):
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_summary(evaluation_paths, gate_settings, gptq_manifests, markdown, html_path, bench_paths=None):
    """``bench_paths``: ``{model: [serving benchmark record, ...]}``; without it, or with no records, the
    summary has no serving section."""
    tables = {"summary": [], "generations": [], "layers": [], "bench": []}
    for model, paths in evaluation_paths.items():
        evaluations = {Path(path).stem: read_json(path, what="evaluation") for path in paths}
        tables["summary"] += summary_rows(model, evaluations, gate_settings[model])
        tables["generations"] += generation_rows(model, evaluations)
        if gptq_manifests.get(model):
            tables["layers"] += layer_error_rows(model, gptq_manifests[model])
    skipped = []
    for model, paths in (bench_paths or {}).items():
        rows, model_skipped = bench_rows(model, paths)
        tables["bench"] += rows
        skipped += model_skipped
    notes = {table_id: note for table_id, _, _, note in SECTIONS}
    if skipped:
        notes["bench"] += " Cases skipped: " + "; ".join(skipped) + "."
    sections = [
        (table_id, title, columns, notes[table_id]) for table_id, title, columns, _ in SECTIONS if tables[table_id]
    ]
    atomic_write_text(
        markdown,
        "\n".join(
            f"{'#' if index == 0 else '##'} {title}\n\n{note}\n\n{markdown_table(columns, tables[table_id])}\n"
            for index, (table_id, title, columns, note) in enumerate(sections)
        ),
    )
    body = "".join(
        f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>{html_table(table_id, columns, tables[table_id])}"
        for table_id, title, columns, note in sections
    )
    atomic_write_text(
        html_path,
        (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Variant summary</title><style>"
            "table{border-collapse:collapse;font-family:sans-serif}td,th{border:1px solid #999;padding:4px 8px;"
            f"white-space:pre-wrap}}</style></head><body>{body}</body></html>\n"
        ),
    )


def save_figure(figure, path):
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_quantization_error(manifest, path, pyplot):
    layers = read_json(manifest, what="GPTQ manifest")["layers"]
    indices = sorted(layers, key=int)
    figure, (in_sample, held_out) = pyplot.subplots(1, 2, figsize=(10, 3.5))
    for scheme, key in (("RTN", "output_error_rtn"), ("GPTQ", "output_error_gptq")):
        in_sample.plot(
            [int(i) for i in indices],
            [sum(m[key] for m in layers[i]["matrices"].values()) for i in indices],
            marker="o",
            label=scheme,
        )
        held_out.plot(
            [int(i) for i in indices],
            [layers[i]["heldout_output_error"][scheme.lower()] for i in indices],
            marker="o",
            label=scheme,
        )
    in_sample.set(yscale="log", xlabel="layer", ylabel="sum of tr(dW H dW^T)", title="in-sample, under the Hessians")
    held_out.set(xlabel="layer", ylabel="relative layer output error", title="held-out samples")
    for axes in (in_sample, held_out):
        axes.legend()
    save_figure(figure, path)


def plot_metrics(evaluations, path, pyplot):
    names = sorted(evaluations, key=lambda name: (name != "float", name))
    figure, (perplexity, divergence) = pyplot.subplots(1, 2, figsize=(10, 3.5))
    perplexity.bar(names, [evaluations[n]["c4"]["perplexity"] or 0 for n in names], color="#4c72b0")
    perplexity.set(ylabel="perplexity", title="perplexity by variant")
    others = [n for n in names if n != "float"]
    divergence.bar(others, [evaluations[n]["c4"].get("kl_divergence") or 0 for n in others], color="#dd8452")
    divergence.set(ylabel="KL(float || variant), nats", title="KL divergence by variant")
    for axes in (perplexity, divergence):
        axes.tick_params(axis="x", rotation=30)
    save_figure(figure, path)


def read_benchmarks(folder):
    """``{stage: (seconds, peak RSS MB)}`` from Snakemake's benchmark files."""
    stages = {}
    for path in sorted(Path(folder).glob("*.tsv")):
        with open(path, newline="") as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        rss = row.get("max_rss", "NA")
        stages[path.stem] = (float(row["s"]), float(rss) if rss not in ("NA", "-", "") else 0.0)
    return stages


def plot_stages(folder, path, pyplot):
    stages = read_benchmarks(folder)
    names = list(stages)
    figure, (wall, memory) = pyplot.subplots(1, 2, figsize=(11, 3.8))
    wall.barh(names, [stages[n][0] for n in names], color="#55a868")
    wall.set(xlabel="wall time, s", title="wall time per stage")
    memory.barh(names, [stages[n][1] for n in names], color="#c44e52")
    memory.set(xlabel="peak RSS, MB", title="peak memory per stage")
    save_figure(figure, path)


def bench_lines(records):
    """``{(variant, input tokens, output tokens): [case, ...]}``, each list by concurrency."""
    lines = {}
    for variant, record in records:
        for case in record["cases"]:
            lines.setdefault((variant, case["input_tokens"], case["output_tokens"]), []).append(case)
    return {key: sorted(cases, key=lambda case: case["concurrency"]) for key, cases in lines.items()}


def completed_value(case, value):
    """``value`` as a float to plot; NaN (a gap in the line) where no request of the case completed."""
    return float("nan") if not case["completed"] or value is None else float(value)


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def plot_serving(bench_paths, path, pyplot):
    lines = bench_lines([read_bench(bench) for bench in bench_paths])
    # a colour per pair of lengths and a line style per variant: the same lengths compare across variants
    variants = list(dict.fromkeys(variant for variant, _, _ in lines))
    lengths = sorted({(input_tokens, output_tokens) for _, input_tokens, output_tokens in lines})
    colours = pyplot.get_cmap("tab10" if len(lengths) <= 10 else "tab20")
    figure, (throughput, first_token) = pyplot.subplots(1, 2, figsize=(12, 4))
    for (variant, input_tokens, output_tokens), cases in lines.items():
        style = {
            "color": colours(lengths.index((input_tokens, output_tokens)) % colours.N),
            "linestyle": LINE_STYLES[variants.index(variant) % len(LINE_STYLES)],
            "marker": MARKERS[variants.index(variant) % len(MARKERS)],
            "label": f"{variant}, in {input_tokens} / out {output_tokens}",
        }
        concurrency = [case["concurrency"] for case in cases]
        throughput.plot(concurrency, [completed_value(c, c["output_tokens_per_s"]) for c in cases], **style)
        first_token.plot(concurrency, [1000 * completed_value(c, c["ttft_s"]["p50"]) for c in cases], **style)
    concurrencies = sorted({case["concurrency"] for cases in lines.values() for case in cases})
    throughput.set(xlabel="concurrency", ylabel="output tokens/s", title="throughput by concurrency")
    first_token.set(xlabel="concurrency", ylabel="TTFT p50, ms", title="time to first token by concurrency")
    for axes in (throughput, first_token):
        axes.set_ylim(bottom=0)
        if concurrencies:
            # concurrency doubles from case to case: even steps on a log scale, labelled with the values run
            axes.set_xscale("log", base=2)
            axes.set_xticks(concurrencies, [str(value) for value in concurrencies])
            axes.set_xticks([], minor=True)
        else:
            axes.text(0.5, 0.5, "no case ran", ha="center", va="center", transform=axes.transAxes)
    if lines:
        first_token.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    save_figure(figure, path)


def headless_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def write_serving_plot(bench_paths, path):
    """The serving benchmark records of one model as one figure."""
    pyplot = headless_pyplot()
    plot_serving(bench_paths, path, pyplot)
    pyplot.close("all")


def write_plots(evaluation_paths, gptq_manifest, benchmarks, output):
    pyplot = headless_pyplot()

    output.mkdir(parents=True, exist_ok=True)
    evaluations = {Path(path).stem: read_json(path, what="evaluation") for path in evaluation_paths}
    plot_metrics(evaluations, output / "metrics.png", pyplot)
    plot_stages(benchmarks, output / "stages.png", pyplot)
    if gptq_manifest:
        plot_quantization_error(gptq_manifest, output / "quantization-error.png", pyplot)
    pyplot.close("all")

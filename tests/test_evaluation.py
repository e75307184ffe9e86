"""Metrics against hand-computed values, the gates' verdicts, the evaluation inputs' checks and the report files."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workflow_scripts.core.errors import CheckFailed, InputError
from workflow_scripts.data.provenance import write_token_tensors
from workflow_scripts.evaluation.evaluate import load_ceval, load_windows
from workflow_scripts.evaluation.gates import GateSettings, check_variants
from workflow_scripts.evaluation.metrics import TokenMetrics, choice_accuracy
from workflow_scripts.evaluation.report import write_plots, write_serving_plot, write_summary
from workflow_scripts.stages.gate import main as gate_main
from workflow_scripts.stages.serving_plot import main as serving_plot_main
from workflow_scripts.stages.summary import main as summary_main


def test_perplexity_of_known_distributions():
    uniform = TokenMetrics()
    uniform.add(torch.zeros(5, 8), torch.tensor([0, 1, 2, 3, 7]))
    assert uniform.figures()["perplexity"] == pytest.approx(8.0)
    half = TokenMetrics()
    # p(target) = 1/2 at every position: logits log(1), log(1/2) twice -> probabilities 1/2, 1/4, 1/4
    logits = torch.log(torch.tensor([[1.0, 0.5, 0.5]])).repeat(3, 1)
    half.add(logits, torch.tensor([0, 0, 0]))
    assert half.figures()["perplexity"] == pytest.approx(2.0)
    assert half.figures()["positions"] == 3


def test_kl_and_top1_agreement():
    identical = TokenMetrics()
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    identical.add(logits, torch.zeros(6, dtype=torch.long), reference=logits)
    assert identical.figures()["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert identical.figures()["top1_agreement"] == 1.0
    shifted = TokenMetrics()
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.25, 0.75])
    shifted.add(q.log().unsqueeze(0), torch.tensor([0]), reference=p.log().unsqueeze(0))
    # KL(p || q) = 0.75 ln 3 + 0.25 ln(1/3) = 0.5 ln 3; the most likely tokens differ
    assert shifted.figures()["kl_divergence"] == pytest.approx(0.5 * math.log(3))
    assert shifted.figures()["top1_agreement"] == 0.0
    # the reference's own perplexity on the same positions: its p(target) = 3/4
    assert shifted.figures()["reference_perplexity"] == pytest.approx(4 / 3)
    assert shifted.figures()["perplexity"] == pytest.approx(4.0)


def test_non_finite_logits_are_counted_and_give_no_perplexity():
    metrics = TokenMetrics()
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    metrics.add(logits, torch.tensor([0, 1, 2]), reference=torch.zeros(3, 4))
    figures = metrics.figures()
    assert figures["non_finite_positions"] == 1 and figures["perplexity"] is None
    assert figures["kl_divergence"] is None


def test_ceval_scoring_picks_the_highest_letter():
    # rows: letters A-D; answers B, D, A -> the first two right, the third wrong (C wins)
    letter_logits = torch.tensor([[0.1, 2.0, 0.3, 0.0], [0.0, 0.0, 0.0, 5.0], [1.0, 0.0, 3.0, 0.0]])
    assert choice_accuracy(letter_logits, torch.tensor([1, 3, 0])) == (2, 3)


def record(perplexity, reference=100.0, kl=1e-4, top1=0.99, non_finite=0, backend="eager"):
    return {
        "backend": backend,
        "c4": {
            "perplexity": perplexity,
            "reference_perplexity": reference,
            "kl_divergence": kl,
            "top1_agreement": top1,
            "non_finite_positions": non_finite,
            "positions": 100,
        },
        "ceval": {"accuracy": 0.25, "questions": 8},
    }


GATES = GateSettings(max_perplexity_increase=0.01, min_top1_agreement=0.98, max_kl_divergence=0.005)


def test_gates_name_the_variant_the_metric_and_both_values(tmp_path):
    evaluations = {
        "float": record(100.0, kl=None, top1=None),
        "rtn-int8": record(100.5),
        "gptq-int8": record(102.0, top1=0.95),
        "aoti-float": record(None, kl=None, non_finite=7),
    }
    checks = check_variants(evaluations, GATES)
    assert {c["variant"] for c in checks if not c["passed"]} == {"gptq-int8", "aoti-float"}
    assert all(c["passed"] for c in checks if c["variant"] == "rtn-int8")
    assert [c["metric"] for c in checks if c["variant"] == "rtn-int8"] == [
        "perplexity_increase",
        "top1_agreement",
        "kl_divergence",
    ]
    paths = []
    for name, value in evaluations.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(value))
    with pytest.raises(CheckFailed) as failure:
        gate_main(
            [
                "--model",
                "m",
                "--evaluations",
                *map(str, paths),
                "--settings",
                json.dumps(GATES.record()),
                "--output",
                str(tmp_path / "gate.json"),
            ]
        )
    message = str(failure.value)
    assert "gptq-int8: perplexity_increase 0.02, required <= 0.01" in message
    assert "gptq-int8: top1_agreement 0.95, required >= 0.98" in message
    assert (
        "aoti-float: perplexity_increase not finite, required <= 0.01 (7 positions with non-finite logits)" in message
    )
    assert not (tmp_path / "gate.json").exists()
    assert (
        check_variants(evaluations, dataclasses.replace(GATES, min_top1_agreement=None, max_perplexity_increase=None))[
            0
        ]["metric"]
        == "kl_divergence"
    )


def test_summary_and_plots_still_build_when_a_variant_is_broken(tmp_path):
    evaluations = {
        "float": record(100.0, kl=None, top1=None),
        "rtn-int8": record(100.2),
        "aoti-rtn-int8": record(None, kl=None, non_finite=3, backend="aoti"),
    }
    paths = []
    for name, value in evaluations.items():
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    evaluations["rtn-int8"]["generations"] = [
        {"prompt": "The capital | of France is", "completion": " Paris.\nIt", "token_ids": [1, 2, 3]}
    ]
    paths = []
    for name, value in evaluations.items():
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    manifest = tmp_path / "gptq.json"
    manifest.write_text(
        json.dumps(
            {
                "layers": {
                    str(i): {
                        "matrices": {"w": {"output_error_rtn": 2.0 + i, "output_error_gptq": 1.0}},
                        "heldout_output_error": {"rtn": 0.02, "gptq": 0.01},
                    }
                    for i in range(3)
                }
            }
        )
    )
    write_summary({"m": paths}, {"m": GATES}, {"m": str(manifest)}, tmp_path / "summary.md", tmp_path / "summary.html")
    markdown = (tmp_path / "summary.md").read_text()
    assert "| m | rtn-int8 | eager | 100.2 | +0.200% | 0.0001 | 0.99 | 0.25 (8 q) | pass |" in markdown
    assert "| m | aoti-rtn-int8 | aoti | n/a | n/a |" in markdown and "FAIL: aoti-rtn-int8" in markdown
    assert markdown.index("| m | float |") < markdown.index("| m | aoti-rtn-int8 |")
    # table cells keep their row: a pipe or a newline in generated text is escaped
    assert "| m | The capital \\| of France is | rtn-int8 |  Paris.\\nIt |" in markdown
    assert "| m | 2 | 0.02 | 0.01 | 0.500 |" in markdown
    page = (tmp_path / "summary.html").read_text()
    assert page.count("<tr>") == (1 + 3) + (1 + 1) + (1 + 3) and "<table id='summary'>" in page
    benchmarks = tmp_path / "benchmarks"
    benchmarks.mkdir()
    (benchmarks / "patch.tsv").write_text("s\th:m:s\tmax_rss\n1.5\t0:00:01\t120.0\n")
    write_plots(paths, manifest, benchmarks, tmp_path / "plots")
    for name in ("metrics", "stages", "quantization-error"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no serving benchmark: no serving section, and the model's plots are the three
    assert "Serving benchmark" not in markdown and len(list((tmp_path / "plots").iterdir())) == 3


def bench_case(input_tokens, output_tokens, concurrency, completed, ttft=0.05, tpot=0.01, tokens_per_s=100.0):
    """A case of a serving benchmark record; no completed request: no figures."""
    figures = completed > 0
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "concurrency": concurrency,
        "requests": 4,
        "completed": completed,
        "failed": 4 - completed,
        "errors": [] if completed == 4 else ["APIConnectionError: Connection error."],
        "wall_s": 2.0,
        "ttft_s": {"p50": ttft if figures else None, "p95": 2 * ttft if figures else None, "mean": None},
        "tpot_s": {"p50": tpot if figures else None, "p95": 2 * tpot if figures else None, "mean": None},
        "latency_s": {"p50": None, "p95": None, "mean": None},
        "output_tokens_per_s": tokens_per_s if figures else 0.0,
        "requests_per_s": completed / 2.0,
        "prompt_tokens_reported": [input_tokens] if figures else [],
        "output_tokens_received": [output_tokens] if figures else [],
    }


def bench_record(variant, cases, skipped=()):
    return {
        "model": "m",
        "variant": variant,
        "endpoint": {"url": "http://127.0.0.1:8000/v1", "served_model": "m"},
        "limits": {"max_prompt_tokens": 64, "max_output_tokens": 64},
        "settings": {"inputs": [510], "outputs": [512], "concurrency": [1, 4], "reference_length": 2048},
        "cases": list(cases),
        "skipped": [
            {"input_tokens": i, "output_tokens": o, "concurrency": c, "reason": "longer"} for i, o, c in skipped
        ],
        "wall_s": 5.0,
    }


def test_the_serving_benchmark_is_a_summary_section_and_a_plot(tmp_path):
    evaluation = tmp_path / "float.json"
    evaluation.write_text(json.dumps(record(100.0, kl=None, top1=None)))
    compiled = tmp_path / "bench-aoti-rtn-int8.json"
    compiled.write_text(
        json.dumps(
            bench_record(
                "aoti-rtn-int8",
                [bench_case(15, 16, 1, 4, ttft=0.0123, tpot=0.0045), bench_case(15, 16, 4, 0)],
                skipped=[(127, 16, 1), (127, 16, 4)],
            )
        )
    )
    # a record without a variant label is named by its file
    eager = tmp_path / "float.bench.json"
    eager.write_text(json.dumps(bench_record(None, [bench_case(15, 16, 1, 4), bench_case(15, 16, 4, 4)])))
    summary = (tmp_path / "summary.md", tmp_path / "summary.html")
    summary_main(
        ["--evaluations", json.dumps({"m": [str(evaluation)]}), "--gates", json.dumps({"m": GATES.record()})]
        + ["--gptq", json.dumps({"m": None}), "--bench", json.dumps({"m": [str(compiled), str(eager)]})]
        + ["--markdown", str(summary[0]), "--html", str(summary[1])]
    )
    markdown = summary[0].read_text()
    assert "## Serving benchmark" in markdown and "Cases skipped: m aoti-rtn-int8: 2." in markdown
    assert "| m | aoti-rtn-int8 | 15 | 16 | 1 | 4/4 | 0 | 12.3 | 24.6 | 4.5 | 9.0 | 100.00 | 2.00 |" in markdown
    # a case whose every request failed is a row of its failures, without figures
    assert "| m | aoti-rtn-int8 | 15 | 16 | 4 | 0/4 | 4 | n/a | n/a | n/a | n/a | 0.00 | 0.00 |" in markdown
    assert "| m | float.bench | 15 | 16 | 4 | 4/4 | 0 |" in markdown
    page = summary[1].read_text()
    assert "<table id='bench'>" in page and page.count("<tr>") == (1 + 1) + (1 + 4)
    # an empty list of records: no section
    write_summary({"m": [str(evaluation)]}, {"m": GATES}, {"m": None}, *summary, bench_paths={"m": []})
    assert "Serving benchmark" not in summary[0].read_text()
    plot = tmp_path / "plots" / "serving.png"
    serving_plot_main(["--bench", str(compiled), str(eager), "--output", str(plot)])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_serving_record_without_cases_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"model": "m", "skipped": []}))
    with pytest.raises(InputError, match=f"serving benchmark {path} has no list 'cases'"):
        write_serving_plot([path], tmp_path / "serving.png")


def test_evaluation_sets_of_another_tokenizer_or_empty_are_refused(tmp_path):
    path, record = tmp_path / "windows.safetensors", tmp_path / "windows.json"
    made_by = {"dataset": "c4", "tokenizer_fingerprint": "aa"}
    write_token_tensors({"input_ids": np.zeros((2, 8), np.int32)}, made_by, path, record)
    with pytest.raises(InputError, match="windows.safetensors: made with tokenizer aa, but the model's tokenizer is"):
        load_windows(path, "bb", None)
    write_token_tensors({"input_ids": np.zeros((0, 8), np.int32)}, made_by, path, record)
    with pytest.raises(InputError, match="holds no evaluation windows"):
        load_windows(path, "aa", None)
    save_file({"input_ids": torch.zeros(2, 8, dtype=torch.int32)}, str(path), metadata={"tokenizer_fingerprint": "aa"})
    with pytest.raises(InputError, match="windows.safetensors: has no 'provenance' metadata naming the tokenizer"):
        load_windows(path, "aa", None)
    ceval = tmp_path / "ceval.json"
    ceval.write_text(json.dumps({**made_by, "questions": [], "letter_token_ids": {}}))
    with pytest.raises(InputError, match="ceval.json: made with tokenizer aa, but the model's tokenizer is bb"):
        load_ceval(ceval, "bb", None)
    with pytest.raises(InputError, match="holds no ceval questions"):
        load_ceval(ceval, "aa", None)

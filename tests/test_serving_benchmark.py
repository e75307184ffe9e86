"""The serving benchmark's plan (the vendor's lengths scaled to the compiled ones, cases too long skipped), its
settings (the schema's defaults and bounds, on the command line too), its statistics, and its prompts of an
exact token count with a SentencePiece and a byte-level tokenizer. The sweep against a live server is tested
with the server."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from workflow_scripts.core.errors import InputError
from workflow_scripts.data.tokenizer_files import write_tokenizer
from workflow_scripts.serving.benchmark import main as benchmark_main
from workflow_scripts.serving.prompts import case_prompts, exact_prompt, single_token_words
from workflow_scripts.serving.sweep import BenchSettings, Case, Limits, plan_cases
from workflow_scripts.serving.timings import Sample, case_record, spread

REPO = Path(__file__).resolve().parents[1]


def settings_of(**given):
    return BenchSettings.with_defaults(given)


def lengths(cases):
    return sorted({case.input_tokens for case in cases}), sorted({case.output_tokens for case in cases})


def test_the_vendor_lengths_scale_to_the_compiled_lengths():
    cases, skipped = plan_cases(settings_of(), Limits(max_prompt_tokens=64, max_output_tokens=64))
    assert lengths(cases) == ([15, 31, 63], [16, 32, 64]) and not skipped
    assert len(cases) == 3 * 3 * 4
    # the vendor's order: input, then output, then concurrency
    assert cases[:5] == [Case(15, 16, 1), Case(15, 16, 4), Case(15, 16, 8), Case(15, 16, 16), Case(15, 32, 1)]


def test_absolute_lengths_over_the_limits_are_skipped_naming_the_compiled_length():
    settings = settings_of(inputs=[100, 600], outputs=[50, 700], concurrency=[1, 4], reference_length=None)
    cases, skipped = plan_cases(settings, Limits(max_prompt_tokens=512, max_output_tokens=512))
    assert cases == [Case(100, 50, 1), Case(100, 50, 4)]
    reasons = {(case["input_tokens"], case["output_tokens"], case["concurrency"]): case["reason"] for case in skipped}
    assert len(reasons) == 6
    assert reasons[(100, 700, 1)] == "output 700 tokens > compiled output budget 512"
    assert reasons[(600, 50, 4)] == "input 600 tokens > compiled prompt length 512"
    assert "prompt length 512" in reasons[(600, 700, 1)] and "output budget 512" in reasons[(600, 700, 1)]
    # an external server of unknown limits runs every case as asked
    cases, skipped = plan_cases(settings, Limits())
    assert len(cases) == 8 and not skipped


def test_scaled_lengths_need_the_limits_they_scale_to():
    with pytest.raises(InputError, match="max_output_tokens is not known.*--reference-length none"):
        plan_cases(settings_of(), Limits(max_prompt_tokens=64))
    # lengths past the reference length scale past the compiled ones and are skipped
    cases, skipped = plan_cases(settings_of(inputs=[1024, 4096]), Limits(64, 64))
    assert lengths(cases)[0] == [32] and {case["input_tokens"] for case in skipped} == {128}


def test_cases_that_scale_to_the_same_lengths_run_once():
    # at 4 tokens, 510 and 1020 of 2048 both scale to 1 (at least 1), and the concurrency 4 is given twice
    settings = settings_of(concurrency=[1, 4, 4])
    cases, skipped = plan_cases(settings, Limits(max_prompt_tokens=4, max_output_tokens=4))
    assert lengths(cases) == ([1, 3], [1, 2, 4])
    assert len(cases) == len(set(cases)) == 2 * 3 * 2 and not skipped


def test_the_defaults_and_bounds_are_the_schemas():
    bench = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["$defs"]["model"]["properties"]["bench"]
    defaults = {key: spec["default"] for key, spec in bench["properties"].items()}
    assert settings_of().record() == {key: defaults[key] for key in settings_of().record()}
    with pytest.raises(InputError, match=r"bench\.concurrency\[0\]: 0 is less than the minimum of 1"):
        settings_of(concurrency=[0, 4])
    with pytest.raises(
        InputError, match=r"bench\.inputs: \[\] should be non-empty; bench\.reference_length: 0 is less"
    ):
        settings_of(reference_length=0, inputs=[])
    with pytest.raises(InputError, match=r"bench\.timeout_s: 0 is less than or equal to the minimum of 0"):
        settings_of(timeout_s=0)
    with pytest.raises(InputError, match="'prompts' was unexpected"):
        settings_of(prompts=3)
    # a stage's settings are all given (the rule hands the validated section), and within the same bounds
    with pytest.raises(InputError, match=r"missing setting\(s\) requests"):
        BenchSettings.of({key: value for key, value in settings_of().record().items() if key != "requests"})
    with pytest.raises(InputError, match=r"bench\.requests: 0 is less than the minimum of 1"):
        BenchSettings.parse(json.dumps({**settings_of().record(), "requests": 0}))
    assert settings_of(inputs=[8], reference_length=None).inputs == (8,)


def test_the_command_line_takes_the_schemas_defaults_and_bounds(tmp_path, monkeypatch):
    """``python -m workflow_scripts.serving.benchmark``: what is not given is the schema's default, ``none`` is a
    null reference length, and a value out of the schema's bounds stops it before any request."""
    runs = []

    def run_benchmark(url, served_model, tokenizer, limits, settings, **labels):
        runs.append((settings, limits))
        return {"settings": settings.record()}

    monkeypatch.setattr("workflow_scripts.serving.benchmark.run_benchmark", run_benchmark)
    write_tokenizer("sentencepiece-v1", tmp_path)
    output = tmp_path / "bench.json"
    arguments = ["--url", "http://host/v1", "--model", "m", "--tokenizer", str(tmp_path), "--output", str(output)]
    benchmark_main([*arguments, "--concurrency", "2", "--reference-length", "none"])
    assert runs == [(settings_of(concurrency=[2], reference_length=None), Limits())]
    assert json.loads(output.read_text()) == {"settings": runs[0][0].record()}
    with pytest.raises(InputError, match=r"bench\.warmup_requests: -1 is less than the minimum of 0"):
        benchmark_main([*arguments, "--warmup-requests", "-1"])
    assert len(runs) == 1


def test_the_plan_imports_no_model_or_client_libraries():
    """The Snakefile imports the plan to size the benchmark's jobs, at every parse of the workflow."""
    probe = "import sys, workflow_scripts.serving.sweep; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert not set(loaded.stdout.split()) & {"torch", "transformers", "openai", "tokenizers", "fastapi"}


def test_a_case_fills_its_concurrency():
    settings = settings_of(requests=8)
    assert Case(8, 8, 1).requests(settings) == 8 and Case(8, 8, 16).requests(settings) == 16


def test_percentiles_interpolate_between_ranks():
    values = random.Random(0).sample(range(1000), 37)
    expected = {"p50": np.percentile(values, 50), "p95": np.percentile(values, 95), "mean": np.mean(values)}
    assert spread([*values, None]) == pytest.approx(expected)
    assert spread([4.0, 1.0, 2.0, 3.0])["p50"] == 2.5
    assert spread([7.0]) == {"p50": 7.0, "p95": 7.0, "mean": 7.0}
    assert spread([None, None]) == {"p50": None, "p95": None, "mean": None}


def test_a_case_record_counts_failures_and_rates_over_the_wall_time():
    results = [
        Sample(ttft=0.1, latency=1.1, output_tokens=11, prompt_tokens=20),
        Sample(ttft=0.3, latency=2.3, output_tokens=11, prompt_tokens=20),
        "APIConnectionError: Connection error.",
        "timed out after 5 s",
        "APIConnectionError: Connection error.",
    ]
    record = case_record(Case(20, 11, 4), results, wall_s=4.0)
    assert (record["requests"], record["completed"], record["failed"]) == (5, 2, 3)
    assert record["errors"] == ["APIConnectionError: Connection error.", "timed out after 5 s"]
    assert record["ttft_s"]["p50"] == pytest.approx(0.2) and record["latency_s"]["mean"] == pytest.approx(1.7)
    # (latency - ttft) / (output tokens - 1): 0.1 s and 0.2 s
    assert record["tpot_s"]["p50"] == pytest.approx(0.15)
    assert record["output_tokens_per_s"] == pytest.approx(22 / 4.0) and record["requests_per_s"] == 0.5
    assert record["prompt_tokens_reported"] == [20] and record["output_tokens_received"] == [11]
    # one output token has no time per further token
    assert Sample(ttft=0.1, latency=0.1, output_tokens=1, prompt_tokens=None).tpot is None


@pytest.fixture(scope="session")
def sentencepiece(tmp_path_factory):
    """Mistral-7B's tokenizer as the hub ships it: SentencePiece pieces, a BOS token added to every text."""
    folder = tmp_path_factory.mktemp("sentencepiece")
    write_tokenizer("sentencepiece-v1", folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def byte_level():
    """A GPT-2-style byte-level BPE with no special tokens added (as SmolLM2's), trained on the docs."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([path.read_text() for path in sorted((REPO / "docs").glob("*.md"))], trainer)
    return tokenizer


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level"])
def test_prompts_have_the_exact_token_count_and_differ(request, kind):
    tokenizer = request.getfixturevalue(kind)
    words = single_token_words(tokenizer)
    assert all(word.isascii() and word.isalpha() for word in words)
    rng = random.Random(0)
    for tokens in (2, 15, 63, 510):
        prompts = [exact_prompt(tokenizer, words, tokens, rng) for _ in range(4)]
        assert [len(tokenizer.encode(prompt).ids) for prompt in prompts] == [tokens] * 4
        assert all(prompt.replace(" ", "").isalpha() for prompt in prompts)
        # different first words: no request's prompt is a cached prefix of another's
        if tokens > 2:
            assert len({prompt.split()[0] for prompt in prompts}) > 1


def test_the_prompts_of_a_sweep_are_seeded(sentencepiece):
    words = single_token_words(sentencepiece)
    cases = [Case(31, 16, 1), Case(63, 16, 4)]
    first = case_prompts(sentencepiece, words, cases, settings_of(requests=3))
    assert [len(prompts) for prompts in first] == [3, 4]
    assert first == case_prompts(sentencepiece, words, cases, settings_of(requests=3))
    assert first != case_prompts(sentencepiece, words, cases, settings_of(requests=3, seed=1))


def test_a_length_the_tokenizer_cannot_make_is_refused(sentencepiece):
    # BOS alone is the one token: no room for a word
    with pytest.raises(InputError, match="exactly 1 tokens.*1 special token"):
        exact_prompt(sentencepiece, single_token_words(sentencepiece), 1, random.Random(0))

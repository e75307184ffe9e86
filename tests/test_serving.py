"""Serving a built variant: the batching engine against one-at-a-time decoding, the demo chat templates against
mistral-common, and the HTTP server through the real `openai` client."""

import asyncio
import concurrent.futures
import json
import os
import stat
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import openai
import pytest
import torch

from workflow_scripts.core.errors import InputError
from workflow_scripts.data.tokenizer_files import MISTRAL_COMMON_DATA, TOKENIZERS, write_tokenizer
from workflow_scripts.data.tokenizers import read_tokenizer
from workflow_scripts.runtime.decode import greedy_decode
from workflow_scripts.serving.api import create_app
from workflow_scripts.serving.engine import Engine, QueueFull, Sampling
from workflow_scripts.serving.local_server import OwnServer
from workflow_scripts.serving.sweep import BenchSettings
from workflow_scripts.serving.text import ChatTemplate, TextStream
from workflow_scripts.serving.variant import EagerShape, load_variant

from conftest import run_stage, stage_env

SHAPE = EagerShape(batch=3, context=160, device="cpu")
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,", "Hello")


@pytest.fixture(scope="module")
def eager(patched):
    torch.set_grad_enabled(False)
    return load_variant(patched["ministral"], SHAPE)


@pytest.fixture(scope="module")
def eager_model(patched):
    from workflow_scripts.checkpoint.vacc_code import load_vacc_model

    return load_vacc_model(patched["ministral"], torch.float32, "cpu")


def run_requests(engine, requests, joins=None):
    """Submit ``[(ids, Sampling)]``; ``[(tokens, finish_reason)]`` in the same order. ``joins[index] = (earlier,
    tokens)`` submits request ``index`` from the engine's thread once request ``earlier`` has received ``tokens``
    tokens; the others are submitted at once."""
    joins = joins or {}
    results = [([], None) for _ in requests]
    done = threading.Semaphore(0)
    waiting_on = {}
    for index, (earlier, tokens) in joins.items():
        waiting_on.setdefault((earlier, tokens), []).append(index)

    def submit(index):
        ids, sampling = requests[index]
        engine.submit(ids, sampling, collector(index))

    def collector(index):
        def on_event(token, reason):
            if token is not None:
                results[index][0].append(token)
                for joining in waiting_on.pop((index, len(results[index][0])), []):
                    submit(joining)
            else:
                results[index] = (results[index][0], reason)
                done.release()

        return on_event

    for index in range(len(requests)):
        if index not in joins:
            submit(index)
    engine.start()
    try:
        for _ in requests:
            assert done.acquire(timeout=300), "a request never finished"
    finally:
        engine.stop()
    assert not waiting_on, f"requests never submitted: {waiting_on}"
    return results


def test_requests_batched_and_joining_mid_batch_decode_as_they_would_alone(eager, eager_model):
    """Five prompts of different lengths and budgets through the rows at once: rows free at different steps and the
    waiting requests take them, yet every request gets exactly the tokens that decoding it alone through the
    model's own KV cache gives."""
    tokenizer = read_tokenizer(eager.folder)
    budgets = (24, 5, 12, 3, 9)
    requests = [
        (tokenizer.encode(prompt).ids, Sampling(max_tokens, temperature=0, ignore_eos=True))
        for prompt, max_tokens in zip(PROMPTS, budgets, strict=True)
    ]
    engine = Engine(eager.runner, eager.stop_token_ids)
    results = run_requests(engine, requests)
    for (ids, sampling), (tokens, reason) in zip(requests, results, strict=True):
        alone = greedy_decode(eager_model, torch.tensor([ids]), sampling.max_tokens)[1]
        assert (tokens, reason) == (alone, "length")
    # the rows stepped together: fewer decode steps than the requests' own (each request's first token is its
    # prefill's)
    assert engine.steps < sum(budget - 1 for budget in budgets)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_requests_of_any_lengths_joining_and_leaving_at_any_step_decode_as_they_would_alone(eager, eager_model, seed):
    """Prompts of 1 to 120 tokens (fed 8 at a time, so most take several chunks between other rows' decode steps)
    with 1 to 30 new tokens each, most submitted while others run, at a random token of a random earlier request:
    they join rows at any position and leave them at any step. Each gets the tokens it gets alone."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    vocab = eager_model.config.vocab_size
    requests, joins = [], {}
    for index in range(9):
        ids = torch.randint(3, vocab, (draw(1, 120),), generator=generator).tolist()
        max_tokens = draw(1, 30)
        requests.append((ids, Sampling(max_tokens, temperature=0, ignore_eos=True)))
        if index >= 2:
            earlier = draw(0, index - 1)
            joins[index] = (earlier, draw(1, requests[earlier][1].max_tokens))
    engine = Engine(eager.runner, [], prefill_chunk=8)
    results = run_requests(engine, requests, joins)
    for (ids, sampling), (tokens, reason) in zip(requests, results, strict=True):
        alone = greedy_decode(eager_model, torch.tensor([ids]), sampling.max_tokens)[1]
        assert (tokens, reason) == (alone, "length")


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(eager):
    ids = read_tokenizer(eager.folder).encode(PROMPTS[0]).ids
    requests = [
        (ids, Sampling(10, temperature=1.0, seed=1, ignore_eos=True)),
        (ids, Sampling(10, temperature=1.0, seed=1, ignore_eos=True)),
        (ids, Sampling(10, temperature=1.0, seed=2, ignore_eos=True)),
        (ids, Sampling(10, temperature=0.7, top_p=1e-6, seed=3, ignore_eos=True)),
        (ids, Sampling(10, temperature=0, ignore_eos=True)),
    ]
    same_seed, again, other_seed, tiny_top_p, greedy = (
        tokens for tokens, _ in run_requests(Engine(eager.runner, []), requests)
    )
    assert same_seed == again and same_seed != other_seed
    assert tiny_top_p == greedy


def test_the_engine_refuses_what_its_graphs_cannot_serve_and_bounds_its_queue(eager):
    engine = Engine(eager.runner, eager.stop_token_ids, max_queue=2)
    with pytest.raises(InputError, match="the prompt has 160 tokens; this variant's context is 160 tokens"):
        engine.submit(list(range(1, 161)), Sampling(4), print)
    with pytest.raises(InputError, match="max_tokens is 159; a prompt of 2 tokens leaves 1 to 158 new tokens"):
        engine.submit([1, 2], Sampling(159), print)
    engine.submit([1, 2], Sampling(4), print)
    engine.submit([1, 2], Sampling(4), print)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], Sampling(4), print)


def test_a_stop_string_ends_the_text_before_it_even_across_tokens(eager):
    tokenizer = read_tokenizer(eager.folder)
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["a gam"])
    pieces = [stream.add(token) for token in ids]
    assert stream.stopped and "".join(pieces) == "alpha bet"
    plain = TextStream(tokenizer)
    assert "".join(plain.add(token) for token in ids) + plain.flush() == "alpha beta gamma delta"


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_the_demo_chat_templates_encode_as_mistral_common_does(kind, tmp_path):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    write_tokenizer(kind, tmp_path)
    template, tokenizer = ChatTemplate(tmp_path), read_tokenizer(tmp_path)
    reference = MistralTokenizer.from_file(str(MISTRAL_COMMON_DATA / TOKENIZERS[kind]["source"]))
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "And of Italy?"},
        ],
    ]
    for chat in chats:
        ours = tokenizer.encode(template.render(chat), add_special_tokens=False).ids
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in chat])
        assert ours == reference.encode_chat_completion(request).tokens
    with pytest.raises(InputError, match="roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_a_chat_role_the_server_does_not_take_is_a_400_naming_it():
    """OpenAI refuses an unknown role with a 400; this server takes system, user and assistant only (no tool
    calls), and refuses the others before the chat template sees them, in OpenAI's error body. The app runs
    in-process, driven by the openai client through its own HTTP library's ASGI transport."""
    import httpx2

    def template_reached(messages):
        raise InputError("the chat template got the messages")

    template = types.SimpleNamespace(render=template_reached)
    app = create_app(types.SimpleNamespace(name="m", tokenizer=None), None, template)

    async def chat(*roles):
        http_client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
        async with openai.AsyncOpenAI(base_url="http://app/v1", api_key="none", http_client=http_client) as client:
            messages = [{"role": role, "content": "Hi"} for role in roles]
            await client.chat.completions.create(model="m", messages=messages)

    for role in ("wizard", "developer", "tool"):
        with pytest.raises(openai.BadRequestError) as refused:
            asyncio.run(chat("system", "user", role))
        assert refused.value.body == {
            "message": f"messages[2].role: {role!r} is not a role this server takes; it takes 'system', 'user', "
            "'assistant'",
            "type": "invalid_request_error",
            "param": "messages[2].role",
            "code": "invalid_value",
        }
    with pytest.raises(openai.BadRequestError, match="the chat template got the messages"):
        asyncio.run(chat("system", "user", "assistant", "user"))


def start_server(folder, tmp_path, *arguments):
    """Our server of ``folder`` on a free loopback port, with an ``openai`` client (no retries) as ``.client``."""
    log = open(tmp_path / f"server-{time.monotonic_ns()}.log", "w")
    server = OwnServer(folder, *arguments, output=log).__enter__()
    server.client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    return server


@pytest.fixture(scope="module")
def served(compiled, tmp_path_factory):
    """The compiled float package (two rows of 2048 tokens) behind the server."""
    server = start_server(compiled / "aoti" / "float", tmp_path_factory.mktemp("serve"), "--max-queue", "64")
    yield server
    server.stop()


def complete(server, prompt, **options):
    return server.client.completions.create(model=server.model, prompt=prompt, temperature=0, **options)


@pytest.mark.slow  # compiles AOTInductor packages
def test_completions_match_the_compiled_runner_and_stream_the_same_text(served, compiled):
    from workflow_scripts.runtime.package import load_compiled

    models = served.client.models.list()
    assert [model.id for model in models.data] == ["ministral-float"]
    runner, tokenizer, graphs = load_compiled(compiled / "aoti" / "float")
    ids = tokenizer.encode(PROMPTS[0]).ids
    expected = runner.generate(ids, 12)[0]
    whole = complete(served, PROMPTS[0], max_tokens=12, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 12)
    chunks = list(
        complete(
            served,
            PROMPTS[0],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.slow  # compiles AOTInductor packages
def test_a_stop_sequence_and_the_chat_template(served):
    whole = complete(served, PROMPTS[1], max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    stopped = complete(served, PROMPTS[1], max_tokens=16, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.text == whole[: whole.index(stop)] and stopped.finish_reason == "stop"
    chat = served.client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    template_ids = read_tokenizer(served.folder).encode("[INST]Hi[/INST]").ids
    assert chat.usage.prompt_tokens == len(template_ids) and chat.choices[0].message.role == "assistant"
    streamed = served.client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == chat.choices[0].message.content


@pytest.mark.slow  # compiles AOTInductor packages
def test_more_concurrent_requests_than_rows_all_get_their_own_answer(served):
    """Eight requests at once on two rows: they queue, take the rows as they free, and each gets what it gets
    alone."""
    prompts = [f"{PROMPTS[index % len(PROMPTS)]} {index}" for index in range(8)]
    alone = [
        complete(served, prompt, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text for prompt in prompts
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda prompt: complete(served, prompt, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text,
                prompts,
            )
        )
    assert together == alone


@pytest.mark.slow  # compiles AOTInductor packages
def test_a_chat_prompt_of_1500_tokens_is_answered_and_costs_its_length(served, compiled):
    """A long chat prompt is fed in chunks and answered with what the package gives it alone."""
    from workflow_scripts.runtime.package import load_compiled

    runner, tokenizer, _ = load_compiled(compiled / "aoti" / "float")
    words = " ".join(f"w{index}" for index in range(2000))
    content = tokenizer.decode(tokenizer.encode(words, add_special_tokens=False).ids[:1520])
    messages = [{"role": "user", "content": content}]
    chat = served.client.chat.completions.create(
        model=served.model, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = tokenizer.encode(f"[INST]{content}[/INST]").ids
    assert chat.usage.prompt_tokens == len(ids) >= 1500
    assert chat.choices[0].message.content == tokenizer.decode(runner.generate(ids, 8)[0], skip_special_tokens=True)


@pytest.mark.slow  # compiles AOTInductor packages
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    bad = [
        (lambda: complete(served, "word " * 2100), openai.BadRequestError, "this variant's context is 2048 tokens"),
        (lambda: complete(served, "Hi", max_tokens=3000), openai.BadRequestError, r"leaves 1 to \d+ new tokens"),
        (
            lambda: served.client.completions.create(model="nonexistent", prompt="Hi"),
            openai.NotFoundError,
            "model 'nonexistent' does not exist",
        ),
        (lambda: complete(served, "Hi", n=2), openai.BadRequestError, "n: Input should be 1"),
        (lambda: complete(served, [10**9]), openai.BadRequestError, "outside the vocabulary"),
        (
            lambda: served.client.chat.completions.create(model=served.model, messages=[]),
            openai.BadRequestError,
            "messages",
        ),
    ]
    for call, error, message in bad:
        with pytest.raises(error, match=message):
            call()
        assert complete(served, "Hi", max_tokens=2).choices[0].text is not None
    malformed = urllib.request.Request(
        f"{served.url}/completions", data=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(malformed, timeout=30)
    assert refused.value.code == 400 and "not valid JSON" in json.load(refused.value)["error"]["message"]
    assert served.process.poll() is None


@pytest.mark.slow  # loads a checkpoint in a server
def test_an_eager_checkpoint_is_served_and_a_full_queue_answers_503(patched, compiled, tmp_path):
    """The patched checkpoint, with no package, through the same engine: the compiled float package's answer;
    with one row and a queue of one, a burst gets 503s with Retry-After and no request is lost."""
    server = start_server(patched["ministral"], tmp_path, "--batch=1", "--context=48", "--max-queue=1")
    try:
        assert server.model == "ministral-float"
        runner, tokenizer, _ = load_compiled_float(compiled)
        expected = tokenizer.decode(runner.generate(tokenizer.encode(PROMPTS[0]).ids, 8)[0], skip_special_tokens=True)
        assert complete(server, PROMPTS[0], max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text == expected
        statuses = []

        def attempt(_):
            try:
                complete(server, PROMPTS[1], max_tokens=16, extra_body={"ignore_eos": True})
                return 200
            except openai.APIStatusError as error:
                assert error.response.headers.get("retry-after") == "1"
                return error.status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(attempt, range(6)))
        assert set(statuses) == {200, 503} and len(statuses) == 6
    finally:
        server.stop()


def load_compiled_float(compiled):
    from workflow_scripts.runtime.package import load_compiled

    return load_compiled(compiled / "aoti" / "float")


# all the settings, as the rule hands them
BENCH = BenchSettings.with_defaults({"inputs": [2040], "outputs": [512, 2048], "concurrency": [1, 3], "requests": 3})
# the compiled package's context of 2048 scales the outputs to 256 and 1024 tokens: shorter ones keep the test short
SHORT_OUTPUTS = BenchSettings.with_defaults({**BENCH.record(), "outputs": [32, 128]})


@pytest.mark.slow  # compiles AOTInductor packages
def test_the_benchmark_stage_serves_sweeps_and_stops(compiled, tmp_path):
    """The rule's stage against our server of the compiled package: the vendor's longest prompt and two outputs
    scaled to its context's halves (1020 tokens in; 16 and 64 out), one and three at a time on its two rows. The
    server counts the prompts' tokens as the client made them, and every request gets all its tokens."""
    output = tmp_path / "bench" / "aoti-float.json"
    folder = compiled / "aoti" / "float"
    result = run_stage(
        "serve_benchmark",
        *("--model", "ministral", "--variant", "aoti-float", "--served", folder / "MANIFEST.json"),
        *("--settings", json.dumps(SHORT_OUTPUTS.record()), "--output", output),
    )
    record = json.loads(output.read_text())
    assert record["server"] == {"folder": str(folder), "backend": "compiled", "batch": 2}
    assert record["limits"] == {"max_prompt_tokens": 2047, "max_output_tokens": 2047, "context_tokens": 2048}
    cases = [(c["input_tokens"], c["output_tokens"], c["concurrency"]) for c in record["cases"]]
    assert cases == [(1020, 16, 1), (1020, 16, 3), (1020, 64, 1), (1020, 64, 3)]
    for case in record["cases"]:
        assert (case["completed"], case["failed"]) == (3, 0)
        assert case["prompt_tokens_reported"] == [1020]
        assert case["output_tokens_received"] == [case["output_tokens"]]
        assert 0 < case["ttft_s"]["p50"] <= case["latency_s"]["p50"] and case["output_tokens_per_s"] > 0
    assert "bench: input 1020, output 64, concurrency 3: 3/3 completed" in result.stderr


FAKE_VASTGENX = """#!{python}
import json, os, sys
# what vastgenx serve takes (docs/vacc-reference.md, step 4); anything else is refused
args = sys.argv[1:]
assert args[0] == "serve", args
options = dict(zip(args[1::2], args[2::2]))
assert set(options) == {{"--model", "--port", "--batch_size", "--llm_devices"}}, options
assert os.path.isfile(os.path.join(options["--model"], "tokenizer", "tokenizer.json")), options["--model"]
assert int(options["--batch_size"]) >= 1 and json.loads(options["--llm_devices"]) == [0, 1], options
with open(os.environ["FAKE_VASTGENX_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
# an OpenAI-compatible server on the port asked: ours, of a compiled package, under the build's name
os.execv(sys.executable, [sys.executable, "-m", "workflow_scripts.serve", os.environ["FAKE_VASTGENX_SERVES"],
         "--port", options["--port"], "--served-model-name", os.path.basename(options["--model"])])
"""


@pytest.mark.slow  # compiles AOTInductor packages
def test_a_vacc_build_is_benchmarked_under_vastgenx_where_it_exists(compiled, tmp_path):
    """A fake vastgenx that checks its call and serves with our server: the stage starts it on a free port with
    the build's folder, batch size and dies, waits for its /v1/models, sweeps it within the build's lengths.
    Without vastgenx on PATH the stage fails saying so, and writes nothing."""
    build = tmp_path / "vacc" / "int8"
    artifact = build / "ministral-int8-tp2-32-48"
    (artifact / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (artifact / "tokenizer" / name).write_bytes((compiled / "aoti" / "float" / name).read_bytes())
    (build / "MANIFEST.json").write_text(json.dumps({"artifact": str(artifact), "name": artifact.name}))
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    fake = bin_folder / "vastgenx"
    fake.write_text(FAKE_VASTGENX.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.jsonl"
    options = {"batch_size": 16, "devices": "[0,1]", "max_prompt_tokens": 32, "max_output_tokens": 16}
    arguments = [
        *("--model", "ministral", "--variant", "vacc-int8", "--served", build / "MANIFEST.json"),
        *("--settings", json.dumps(BENCH.record())),
        *("--vastgenx", json.dumps(options), "--output", tmp_path / "vacc-int8.json"),
    ]
    env = stage_env(FAKE_VASTGENX_CALLS=str(calls), FAKE_VASTGENX_SERVES=str(compiled / "aoti" / "float"))
    missing = run_stage("serve_benchmark", *arguments, env=env, check=False)
    assert missing.returncode == 1 and "vastgenx, VastAI's serving runtime, is not on PATH" in missing.stderr
    assert not (tmp_path / "vacc-int8.json").exists()
    env["PATH"] = f"{bin_folder}{os.pathsep}{env['PATH']}"
    run_stage("serve_benchmark", *arguments, env=env)
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call[:3] == ["serve", "--model", str(artifact)] and call[5:] == [
        "--batch_size",
        "16",
        "--llm_devices",
        "[0,1]",
    ]
    record = json.loads((tmp_path / "vacc-int8.json").read_text())
    assert record["endpoint"]["served_model"] == artifact.name and record["endpoint"]["url"].endswith(f":{call[4]}/v1")
    assert record["server"] == {"folder": str(artifact), "backend": "vastgenx", "batch": 16}
    assert [(c["output_tokens"], c["completed"]) for c in record["cases"]] == [(4, 3), (4, 3), (16, 3), (16, 3)]

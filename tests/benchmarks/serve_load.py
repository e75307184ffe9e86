"""A bounded load on our server (not part of the test run): every request is answered or refused, none is lost,
and the server's memory stays flat.

Starts ``python -m workflow_scripts.serve FOLDER`` on loopback, sends ``--requests`` requests with at most
``--concurrency`` in flight (completions and chats, streamed and not, varied lengths; one in ten a prompt of
up to a quarter of the context in words, and one in ten a bad request: a prompt longer than the context), and
samples the server's resident memory every 0.2 s.
Prints the count of each outcome (200, 4xx, 503, other), the requests that got no answer at all, the memory
after the first tenth of the requests against the end and the peak, and the wall time. Exits 1 if a request
was lost or failed otherwise than with a 4xx or 503.

Usage: python tests/benchmarks/serve_load.py results/demo-ministral/aoti/float [--requests 200]
           [--concurrency 16] [--max-queue 256] [-- server options]
"""

import argparse
import asyncio
import collections
import random
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.serving.local_server import OwnServer  # noqa: E402

WORDS = "the model serves requests in batches and queues the rest until a row is free".split()


def prompt(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one(client, model, index, rng, limits):
    """``(outcome, seconds)``: ``ok``, the HTTP status of a refusal, or the error's type."""
    import openai

    start = time.perf_counter()
    # new tokens of a short answer or a long one, but not the whole context: the run would take hours
    max_tokens = rng.randint(1, min(limits.max_output_tokens, 128))
    try:
        if index % 10 == 9:  # far longer than the context: must be refused with a 400
            await client.completions.create(model=model, prompt=prompt(rng, 4 * limits.max_prompt_tokens))
        elif index % 10 == 4:  # a long prompt, fed in chunks between the other rows' steps
            await client.completions.create(
                model=model, prompt=prompt(rng, rng.randint(100, limits.max_prompt_tokens // 4)), max_tokens=max_tokens
            )
        elif index % 3 == 0:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt(rng, 5)}],
                max_tokens=max_tokens,
                stream=True,
            )
            async for _ in stream:
                pass
        else:
            await client.completions.create(
                model=model, prompt=prompt(rng, rng.randint(1, 12)), max_tokens=max_tokens, temperature=0.7, seed=index
            )
        outcome = "ok"
    except openai.APIStatusError as error:
        outcome = str(error.status_code)
    except Exception as error:  # a timeout or a dropped connection: the server lost it
        outcome = type(error).__name__
    return outcome, time.perf_counter() - start


async def load(server, requests, concurrency, seed):
    import openai

    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)

    async def bounded(index):
        async with gate:
            return await one(client, server.model, index, rng, server.limits)

    results = await asyncio.gather(*(bounded(index) for index in range(requests)))
    await client.close()
    return results


def sample_memory(pid, samples, done):
    process = psutil.Process(pid)
    while not done.is_set():
        samples.append((time.perf_counter(), process.memory_info().rss))
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("server_options", nargs="*")
    args = parser.parse_args()
    with OwnServer(args.folder, f"--max-queue={args.max_queue}", *args.server_options) as server:
        samples, done = [], threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(server.process.pid, samples, done))
        start = time.perf_counter()
        sampler.start()
        results = asyncio.run(load(server, args.requests, args.concurrency, args.seed))
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        alive = server.process.poll() is None
    outcomes = collections.Counter(outcome for outcome, _ in results)
    lost = args.requests - len(results)
    tenth = samples[max(1, len(samples) // 10)][1]
    print(f"server: {server.model}, {server.record['backend']}, batch {server.record['batch']}")
    print(f"{args.requests} requests, at most {args.concurrency} in flight, queue {args.max_queue}: {dict(outcomes)}")
    print(f"lost (no answer): {lost}; server alive at the end: {alive}; wall {wall:.1f} s")
    print(
        f"server RSS: {samples[0][1] / 2**20:.0f} MiB at the start, {tenth / 2**20:.0f} MiB after a tenth of the run,"
        f" {samples[-1][1] / 2**20:.0f} MiB at the end (x{samples[-1][1] / tenth:.3f}),"
        f" peak {max(rss for _, rss in samples) / 2**20:.0f} MiB"
    )
    answered = {"ok", "400", "503"}
    sys.exit(0 if lost == 0 and alive and set(outcomes) <= answered else 1)


if __name__ == "__main__":
    main()

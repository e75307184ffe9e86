"""Benchmark of the calibration stage on a c4-sized train shard (not part of the test run).

Synthesizes a gzip JSON-lines file shaped like ``en/c4-train.00000-of-01024.json.gz``
(default 356,000 documents of generated text, about 480 words on average;
written once and cached under ``.cache/bench/``, about 0.6 GB of disk), then in
one run:

* the stage: ``python -m workflow_scripts.stages.calibration_shard --dataset c4`` as the
  workflow runs it, timed as a whole process, with its peak RSS;
* the baseline: the same texts, already in memory, through raw batched calls
  of the same fast tokenizer (``Tokenizer.encode_batch_fast``, 4096 texts a call).

Both report tokens per second; the figure to watch is their ratio (target >= 0.8).

Usage: python tests/benchmarks/bench_calibration.py [--documents N] [--tokenizer sentencepiece-v1|tekken-240911]
"""

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.core.files import sha256_file  # noqa: E402
from workflow_scripts.core.manifest import write_folder_manifest  # noqa: E402
from workflow_scripts.data.datasets import DATASET_FILES  # noqa: E402
from workflow_scripts.data.demo_datasets import sentence  # noqa: E402
from workflow_scripts.data.tokenizer_files import write_tokenizer  # noqa: E402

CACHE = REPO / ".cache" / "bench"


def synthesize_c4(documents, seed=0):
    folder = CACHE / f"c4-{documents}"
    path = folder / DATASET_FILES["c4"][1]["train"]
    if (folder / "MANIFEST.json").exists():
        return folder
    rng = random.Random(seed)
    pool = [sentence(rng) for _ in range(20000)]
    path.parent.mkdir(parents=True, exist_ok=True)
    (folder / DATASET_FILES["c4"][1]["validation"]).write_bytes(gzip.compress(b'{"text": "unused"}\n'))
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as handle:
        for index in range(documents):
            words = int(rng.lognormvariate(5.7, 0.8))
            sentences = rng.choices(pool, k=max(1, words // 12))
            handle.write(
                json.dumps(
                    {
                        "text": " ".join(sentences),
                        "timestamp": "2019-04-25T12:00:00Z",
                        "url": f"https://example.org/{index}",
                    }
                )
                + "\n"
            )
    write_folder_manifest(folder, {"dataset": "c4", "origin": {"benchmark": documents}})
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=356_000)
    parser.add_argument("--tokenizer", default="sentencepiece-v1")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=1024)
    args = parser.parse_args()

    start = time.monotonic()
    files = synthesize_c4(args.documents)
    tokenizer_folder = CACHE / f"tokenizer-{args.tokenizer}"
    if not (tokenizer_folder / "tokenizer.json").exists():
        tokenizer_folder.mkdir(parents=True, exist_ok=True)
        write_tokenizer(args.tokenizer, tokenizer_folder)
    train = files / DATASET_FILES["c4"][1]["train"]
    print(
        f"input: {train} ({train.stat().st_size / 1e6:.0f} MB gzipped, {args.documents} documents; "
        f"prepared in {time.monotonic() - start:.0f} s)"
    )

    fingerprint = sha256_file(tokenizer_folder / "tokenizer.json")[:16]
    out = CACHE / "out"
    settings = {"split": "train", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    command = [
        sys.executable,
        "-m",
        "workflow_scripts.stages.calibration_shard",
        "--dataset",
        "c4",
        "--files",
        str(files / "MANIFEST.json"),
        "--tokenizer",
        str(tokenizer_folder / "tokenizer.json"),
        "--fingerprint",
        fingerprint,
        "--settings",
        json.dumps(settings),
        "--shard",
        str(out / "c4.safetensors"),
        "--record",
        str(out / "c4.json"),
    ]
    start = time.monotonic()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL)
    stage_seconds = time.monotonic() - start
    stage_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = json.loads((out / "c4.json").read_text())
    tokens = record["stats"]["tokens_tokenized"]

    from tokenizers import Tokenizer

    from workflow_scripts.data.readers import C4Lines

    texts = [text for _, text in C4Lines(train)]
    tokenizer = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    start = time.monotonic()
    # Chunks of 4096 texts: one call over all 356k texts keeps every Encoding alive (about 10 GB).
    raw_tokens = sum(
        len(encoding.ids)
        for first in range(0, len(texts), 4096)
        for encoding in tokenizer.encode_batch_fast(texts[first : first + 4096])
    )
    raw_seconds = time.monotonic() - start
    assert raw_tokens == tokens, (raw_tokens, tokens)

    stage_rate, raw_rate = tokens / stage_seconds, raw_tokens / raw_seconds
    print(
        f"tokenizer {args.tokenizer}: {tokens / 1e6:.1f} M tokens, {record['stats']['records_eligible']} "
        f"documents longer than {args.seqlen}"
    )
    print(
        f"stage (whole process):  {stage_seconds:7.1f} s  {stage_rate / 1e6:6.2f} M tokens/s  "
        f"peak RSS {stage_rss:.0f} MB"
    )
    print(
        f"raw encode_batch_fast:  {raw_seconds:7.1f} s  {raw_rate / 1e6:6.2f} M tokens/s  "
        f"(texts held in memory: {sum(map(len, texts)) / 1e6:.0f} MB)"
    )
    print(f"ratio stage / raw: {stage_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()

"""Small stand-ins for c4, ceval-exam and alpaca-cleaned, generated offline for the embedded demo.

The files have exactly the real datasets' formats and paths (gzip JSON lines
with ``text``/``timestamp``/``url``; a zip of per-subject CSVs under
``dev/``, ``val/``, ``test/``; one JSON array of instruction records), so the
readers and the tokenization stage run the same code as for the real files.
The text is generated here from a small grammar: it is not taken from the
real datasets. The format (c4, alpaca or ceval) picks the generator; output
is byte-identical for the same dataset id and seed.
"""

import csv
import io
import json
import logging
import random
import zipfile

from workflow_scripts.data.assemble import gzip_json_lines
from workflow_scripts.data.datasets import DATASET_FILES

LOG = logging.getLogger(__name__)

SUBJECTS = ("workflow", "compiler", "tokenizer", "quantization", "accelerator", "memory")
NOUNS = (
    "model",
    "layer",
    "tensor",
    "compiler",
    "cluster",
    "weight",
    "token",
    "graph",
    "kernel",
    "cache",
    "scheduler",
    "shard",
    "checkpoint",
    "device",
    "engineer",
    "pipeline",
    "benchmark",
    "river",
    "city",
    "library",
    "garden",
    "window",
    "market",
    "teacher",
    "student",
    "question",
    "answer",
    "signal",
)
ADJECTIVES = (
    "quiet",
    "large",
    "small",
    "static",
    "careful",
    "bright",
    "narrow",
    "patient",
    "quick",
    "distant",
    "simple",
    "strange",
    "useful",
    "early",
    "late",
    "steady",
    "warm",
    "cold",
)
VERBS = (
    "builds",
    "reads",
    "writes",
    "measures",
    "compiles",
    "follows",
    "checks",
    "moves",
    "keeps",
    "finds",
    "opens",
    "explains",
    "changes",
    "counts",
    "carries",
    "watches",
    "repeats",
    "joins",
)
PREPOSITIONS = ("near", "behind", "before", "after", "inside", "beyond", "under", "beside", "without")
CONNECTIVES = ("Meanwhile,", "Later,", "In the morning,", "Still,", "Afterwards,", "For a while,", "Then")


def sentence(rng):
    words = [rng.choice(CONNECTIVES)] if rng.random() < 0.3 else []
    words += [
        "the",
        rng.choice(ADJECTIVES),
        rng.choice(NOUNS),
        rng.choice(VERBS),
        "the",
        rng.choice(NOUNS),
        rng.choice(PREPOSITIONS),
        "the",
        rng.choice(ADJECTIVES),
        rng.choice(NOUNS),
    ]
    if rng.random() < 0.25:
        words += ["at", f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}"]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "!", "?"))


def paragraph(rng, words):
    sentences, count = [], 0
    while count < words:
        sentences.append(sentence(rng))
        count += len(sentences[-1].split())
    return " ".join(sentences)


def document(rng, words):
    paragraphs = [paragraph(rng, 120) for _ in range(max(1, words // 120))]
    return "\n\n".join(paragraphs)


def c4_files(rng):
    def records(count, prefix):
        for index in range(count):
            yield {
                "text": document(rng, rng.randint(100, 2400)),
                "timestamp": f"2019-04-{index % 28 + 1:02d}T12:00:00Z",
                "url": f"https://example.org/{prefix}/{index}",
            }

    return {"train": gzip_json_lines(records(320, "train")), "validation": gzip_json_lines(records(80, "validation"))}


def arithmetic_row(rng, index, with_explanation):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    right = a + b
    wrong = rng.sample([right + d for d in (-11, -10, -2, -1, 1, 2, 9, 10, 11)], 3)
    options = [right, *wrong]
    rng.shuffle(options)
    answer = "ABCD"[options.index(right)]
    row = {
        "id": index,
        "question": f"计算 {a} 加 {b} 的结果是多少？",
        "A": options[0],
        "B": options[1],
        "C": options[2],
        "D": options[3],
        "answer": answer,
    }
    if with_explanation:
        row["explanation"] = f"{a} 加 {b} 等于 {right}，所以选 {answer}。"
    return row


def ceval_files(rng):
    counts = {"dev": 5, "val": 8, "test": 6}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(30):
            subject = f"{SUBJECTS[index % len(SUBJECTS)]}_{index // len(SUBJECTS)}"
            for split, count in counts.items():
                columns = ["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if split == "dev" else [])
                text = io.StringIO()
                writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                for row_id in range(count):
                    row = arithmetic_row(rng, row_id, split == "dev")
                    if split == "test":
                        row["answer"] = ""
                    writer.writerow(row)
                info = zipfile.ZipInfo(f"{split}/{subject}_{split}.csv", date_time=(2023, 5, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, text.getvalue())
    return {"archive": buffer.getvalue()}


def alpaca_files(rng):
    records = []
    for _ in range(300):
        noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
        if rng.random() < 0.4:
            record = {
                "instruction": f"Summarize the following note about the {noun}.",
                "input": paragraph(rng, rng.randint(20, 120)),
                "output": paragraph(rng, rng.randint(15, 60)),
            }
        else:
            record = {
                "instruction": f"Explain how a {rng.choice(ADJECTIVES)} {noun} relates to the {other}.",
                "input": "",
                "output": paragraph(rng, rng.randint(20, 200)),
            }
        records.append(record)
    return {"train": json.dumps(records, ensure_ascii=False, indent=4).encode("utf-8")}


GENERATORS = {"c4": c4_files, "ceval": ceval_files, "alpaca": alpaca_files}


def generate(dataset, data_format, source, staging):
    """``assemble_dataset`` filler for a ``source: {demo: true, seed}`` entry."""
    seed = source.get("seed", 0)
    LOG.info("dataset %s: generating demo %s files (seed %d)", dataset, data_format, seed)
    # seeded by the id: the same text as before formats were separate for c4, alpaca and ceval
    for role, data in GENERATORS[data_format](random.Random(f"{dataset}:{seed}")).items():
        path = staging / DATASET_FILES[data_format][1][role]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"demo": True, "seed": seed}, {"generated"}

"""Readers and prompt formats of the three calibration datasets, with errors that name file and line.

The Hugging Face ``datasets`` library is not used: c4's train shard must be
streamed with the line number of any malformed record in the error (its JSON
builder reports neither), ceval's CSVs are read straight out of the zip after
checking every member name (``datasets`` extracts archives to a cache first),
and nothing here should copy hundreds of MB into an Arrow cache only to read
each record once.
"""

import csv
import gzip
import io
import json
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from workflow_scripts.core.errors import InputError

CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
CEVAL_SPLITS = ("dev", "val", "test")
LETTERS = ("A", "B", "C", "D")


class C4Lines:
    """Iterate ``(line_number, text)`` over a gzip JSON-lines file, one line in memory at a time.

    ``position`` tells how far through the compressed file (of ``size`` bytes) the iteration is.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.size = max(self.path.stat().st_size, 1)
        self.position = 0

    def __iter__(self):
        path, count = self.path, 0
        try:
            # bytes, decoded line by line: a line that is not UTF-8 is then named by its number
            with open(path, "rb") as raw, gzip.open(raw, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    self.position = raw.tell()
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line.decode("utf-8"))["text"]
                    except UnicodeDecodeError as error:
                        raise InputError(f"{path}: line {number} is not UTF-8 text ({error})") from None
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise InputError(
                            f"{path}: line {number} is not a JSON object with a 'text' field "
                            f"({error.__class__.__name__}: {error})"
                        ) from None
                    if not isinstance(text, str) or not text.strip():
                        raise InputError(f"{path}: line {number} has an empty 'text'")
                    count += 1
                    yield number, text
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise InputError(f"{path}: not a complete gzip file ({error}); delete it and fetch it again") from None
        if count == 0:
            raise InputError(f"{path}: contains no records")


def alpaca_prompt(record):
    """The standard Alpaca prompt with its response."""
    if record.get("input"):
        head = (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n"
        )
    else:
        head = (
            "Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{record['instruction']}\n\n"
        )
    return f"{head}### Response:\n{record['output']}"


def read_alpaca(path):
    """The records of alpaca_data_cleaned.json (a JSON array, 44 MB: read whole), checked."""
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON: line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON array of records")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"instruction", "input", "output"} <= set(record):
            raise InputError(f"{path}: record {index} lacks instruction/input/output")
        if not str(record["instruction"]).strip() or not str(record["output"]).strip():
            raise InputError(f"{path}: record {index} has an empty instruction or output")
    return records


def _safe_member(path, name):
    member = PurePosixPath(name)
    if member.is_absolute() or ".." in member.parts or "\\" in name:
        raise InputError(f"{path}: archive member {name!r} points outside the archive root; refusing the archive")
    return member


def read_ceval(path, split):
    """``{subject: [row, ...]}`` of one split, read from the zip without extracting it."""
    if split not in CEVAL_SPLITS:
        raise InputError(f"{path}: unknown ceval split {split!r} (expected one of {', '.join(CEVAL_SPLITS)})")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise InputError(f"{path}: not a zip archive ({error})") from None
    subjects = {}
    with archive:
        members = [(_safe_member(path, info.filename), info) for info in archive.infolist()]
        for member, info in sorted(members, key=lambda item: item[1].filename):
            if info.is_dir() or member.suffix != ".csv" or len(member.parts) < 2 or member.parts[-2] != split:
                continue
            subject = member.stem.removesuffix(f"_{split}")
            with archive.open(info) as raw:
                reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8-sig"))
                missing = [column for column in CEVAL_COLUMNS if column not in (reader.fieldnames or [])]
                if missing:
                    raise InputError(f"{path}: {info.filename} lacks the column(s) {', '.join(missing)}")
                rows = []
                for number, row in enumerate(reader, start=2):
                    if not row["question"].strip():
                        raise InputError(f"{path}: {info.filename} line {number} has an empty question")
                    rows.append(row)
            subjects[subject] = rows
    if not subjects:
        raise InputError(f"{path}: has no {split}/*.csv members")
    return subjects


def ceval_question(row):
    """Question and the four options; the answer is left for the caller."""
    options = "\n".join(f"{letter}. {row[letter]}" for letter in LETTERS)
    return f"{row['question']}\n{options}\n答案："


def ceval_text(row):
    """A calibration sample: question, options and, where the split has it, the answer."""
    return ceval_question(row) + row.get("answer", "").strip()


def ceval_header(subject):
    return f"以下是中国关于{subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"

"""Real English text for calibration and evaluation, offline: Python's own documentation.

Every CPython carries two bodies of human-written English under the PSF
licence, with no network needed: the Language Reference topics of ``pydoc``
(``pydoc_data.topics``) and the docstrings of the standard library. One
document is made per topic (``topics/<name>``) and one per standard-library
module (``stdlib/<module>``: its module docstring, then its class and function
docstrings in source order, blank-line separated); documents under
``MIN_CHARS`` characters are left out, and of documents with the same text only
the first by name is kept.

A document goes to the validation split when a hash of its name falls in the
first ``VALIDATION_PERCENT`` percent, else to train, so the two are disjoint by
construction; the files hold the documents in the order of that hash, so the
first validation documents, which the perplexity windows take, mix topics and
modules. Some modules repeat each other's docstrings: validation
paragraphs that occur in a train document, or share a run of ``SHARED_RUN``
characters with the train documents, are dropped from their document, so no
validation text of that length is in the train file.

The files have the real datasets' formats and paths: c4's gzip JSON lines
(``text``, a fixed ``timestamp``, ``url`` ``python-docs://<name>``) or an
alpaca array of instruction records made from train documents only. The text
depends on the interpreter (its version and the standard library installed),
which the manifest's origin records; the same interpreter gives byte-identical
files.
"""

import ast
import hashlib
import itertools
import json
import logging
import sys
import sysconfig
import warnings
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.data.assemble import gzip_json_lines
from workflow_scripts.data.datasets import DATASET_FILES

LOG = logging.getLogger(__name__)

MIN_CHARS = 500
VALIDATION_PERCENT = 10
SHARED_RUN = 64
TIMESTAMP = "2001-04-17T00:00:00Z"  # fixed: the date the PSF was founded, not the text's
URL_SCHEME = "python-docs://"
# folders of the standard library that hold tests, tools or third-party code, not the library's documentation
SKIPPED_FOLDERS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
FORMATS = ("c4", "alpaca")
ALPACA_PARAGRAPHS = 3


def topic_documents():
    from pydoc_data.topics import topics

    return {f"topics/{name}": text.strip() for name, text in topics.items()}


def docstrings(node):
    """The docstrings of ``node`` and of the classes and functions inside it, in source order."""
    if isinstance(node, DOCUMENTED):
        text = ast.get_docstring(node, clean=True)
        if text and text.strip():
            yield text.strip()
    for child in ast.iter_child_nodes(node):
        yield from docstrings(child)


def module_name(relative):
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stdlib_documents(root=None):
    root = Path(root or sysconfig.get_paths()["stdlib"])
    documents = {}
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        if any(part in SKIPPED_FOLDERS or part.startswith("config-") for part in relative.parts[:-1]):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules' strings
            try:
                tree = ast.parse(path.read_bytes(), str(path))
            except (SyntaxError, ValueError) as error:
                LOG.info("python docs: %s skipped, it does not parse (%s)", relative, error)
                continue
        name = module_name(relative)
        if name:
            documents[f"stdlib/{name}"] = "\n\n".join(docstrings(tree))
    return documents


def documents(root=None):
    """``{name: text}`` in name order: topics and modules, without short ones and repeated texts."""
    found = {**topic_documents(), **stdlib_documents(root)}
    kept, seen = {}, set()
    for name in sorted(found):
        text = found[name]
        digest = hashlib.sha256(text.encode()).digest()
        if len(text) < MIN_CHARS or digest in seen:
            continue
        seen.add(digest)
        kept[name] = text
    return kept


def name_key(name):
    return int.from_bytes(hashlib.blake2b(f"python-docs:{name}".encode(), digest_size=8).digest(), "big")


def in_validation(name):
    return name_key(name) % 100 < VALIDATION_PERCENT


def paragraphs(text):
    return [paragraph for paragraph in text.split("\n\n") if paragraph.strip()]


class RunFinder:
    """Whether a text shares a run of at least ``length`` characters with ``corpus``.

    Any such run covers one of the corpus's blocks of ``length // 2`` characters at a multiple of that
    length, so only those blocks are indexed; each hit is extended both ways to its full length.
    """

    def __init__(self, corpus, length=SHARED_RUN):
        self.corpus, self.length, self.block = corpus, length, length // 2
        self.blocks = {}
        for start in range(0, len(corpus) - self.block + 1, self.block):
            self.blocks.setdefault(corpus[start : start + self.block], []).append(start)

    def shared_run(self, text):
        """Where in ``text`` the first shared run starts, or None."""
        corpus, block = self.corpus, self.block
        for index in range(len(text) - block + 1):
            for start in self.blocks.get(text[index : index + block], ()):
                left = 0
                while left < index and left < start and text[index - left - 1] == corpus[start - left - 1]:
                    left += 1
                right = block
                while (
                    index + right < len(text)
                    and start + right < len(corpus)
                    and text[index + right] == corpus[start + right]
                ):
                    right += 1
                if left + right >= self.length:
                    return index - left
        return None


def split(found):
    """``(train, validation)``, each ``{name: text}`` in hash order; no validation paragraph shares a long
    run with train."""
    found = {name: found[name] for name in sorted(found, key=name_key)}
    train = {name: text for name, text in found.items() if not in_validation(name)}
    finder = RunFinder("\0".join(train.values()))
    seen = {paragraph.strip() for text in train.values() for paragraph in paragraphs(text)}
    validation = {}
    for name, text in found.items():
        if not in_validation(name):
            continue
        kept = [p for p in paragraphs(text) if p.strip() not in seen and finder.shared_run(p) is None]
        # a run across two kept paragraphs: drop the one where it starts
        while kept and (start := finder.shared_run("\n\n".join(kept))) is not None:
            ends = itertools.accumulate(len(p) + 2 for p in kept)
            kept.pop(next(index for index, end in enumerate(ends) if start < end))
        unseen = "\n\n".join(kept)
        if len(unseen) >= MIN_CHARS:
            validation[name] = unseen
    return train, validation


def c4_records(split_documents):
    for name, text in split_documents.items():
        yield {"text": text, "timestamp": TIMESTAMP, "url": URL_SCHEME + name}


def c4_files(train, validation):
    return {"train": gzip_json_lines(c4_records(train)), "validation": gzip_json_lines(c4_records(validation))}


def alpaca_files(train, validation):
    records = []
    for name, text in train.items():
        kind, subject = name.split("/", 1)
        instruction = (
            f"Explain the Python language topic '{subject}'."
            if kind == "topics"
            else f"Describe what the Python standard library module '{subject}' provides."
        )
        records.append(
            {"instruction": instruction, "input": "", "output": "\n\n".join(paragraphs(text)[:ALPACA_PARAGRAPHS])}
        )
    return {"train": json.dumps(records, ensure_ascii=False, indent=4).encode("utf-8")}


GENERATORS = {"c4": c4_files, "alpaca": alpaca_files}


def generate(dataset, data_format, source, staging):
    """``assemble_dataset`` filler for a ``source: {python_docs: true}`` entry."""
    if data_format not in GENERATORS:
        raise InputError(
            f"dataset {dataset}: a python_docs source gives {' or '.join(FORMATS)} files, not {data_format}"
        )
    train, validation = split(documents())
    if not train or not validation:
        raise InputError(
            f"dataset {dataset}: this interpreter's documentation gives {len(train)} train and "
            f"{len(validation)} validation documents"
        )
    LOG.info(
        "dataset %s: %d train and %d validation documents from Python %s's documentation",
        dataset,
        len(train),
        len(validation),
        sys.version.split()[0],
    )
    for role, data in GENERATORS[data_format](train, validation).items():
        path = staging / DATASET_FILES[data_format][1][role]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    origin = {
        "python_docs": True,
        "python": sys.version,
        "implementation": sys.implementation.name,
        "documents": {"train": len(train), "validation": len(validation)},
        "validation_percent": VALIDATION_PERCENT,
        "min_chars": MIN_CHARS,
    }
    return origin, {"generated"}

"""A variant's quality figures against float (stage 6, ``results/{model}/eval/{variant}.json``).

Variants: ``float``, ``rtn-int8``, ``gptq-int8`` run eagerly from their
checkpoints; ``aoti-<variant>`` run the compiled packages. On the c4
validation windows each gets its perplexity and, against the float eager
model on the same positions, the KL divergence and top-1 agreement of its
next-token distributions (:mod:`workflow_scripts.evaluation.metrics`). On ceval it gets
the accuracy of choosing the answer letter with the highest logit after the
few-shot prompt, per subject and overall. Each variant also completes the
model's fixed ``prompts`` greedily with its own runtime (the compiled
variants through their packages), so the report shows that every variant
still answers.

Every variant scores every position of every window: the compiled ones feed
each window through their packages' chunked prefill, which gives the logits
of every position, so their figures compare with the eager ones position for
position; ceval questions longer than a package's context are skipped (the
record says how many).

The variant and the reference are never resident together
(:func:`score_windows`), so an int8 variant of a 7B model is scored in the
memory of its bf16 reference alone.
"""

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from workflow_scripts.checkpoint.folder import stop_token_ids
from workflow_scripts.checkpoint.vacc_code import load_vacc_model
from workflow_scripts.core.devices import (
    available_memory_bytes,
    load_computing_in,
    resolve_device,
    resolve_dtype,
    stored_bytes,
)
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json, read_json, sha256_file
from workflow_scripts.core.manifest import MANIFEST_NAME
from workflow_scripts.core.progress import Progress
from workflow_scripts.core.settings import Settings
from workflow_scripts.core.variants import Variant, parse
from workflow_scripts.data.provenance import check_tokenizer
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, file_fingerprint, read_tokenizer
from workflow_scripts.evaluation import REFERENCE_LOGITS_BYTES
from workflow_scripts.evaluation.metrics import TokenMetrics, choice_accuracy
from workflow_scripts.runtime.decode import greedy_decode
from workflow_scripts.runtime.package import GRAPHS_FILE, load_compiled

LOG = logging.getLogger(__name__)

CHUNK = 256  # positions per log-softmax, so a large vocabulary never needs one huge float64 copy


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """``models.<id>.evaluate`` less ``dataset`` (the rule's: its windows come as a file). ``None`` limits
    mean every window or question of the evaluation set."""

    device: str
    dtype: str
    c4_windows: int | None
    ceval_questions: int | None
    prompts: tuple[str, ...]
    generate_tokens: int


def load_model(checkpoint, dtype, device):
    # every position's logits, not only the last one that the VACC prefill graph keeps
    return load_computing_in(
        lambda dtype, device: load_vacc_model(checkpoint, dtype, device, insert_slice=False),
        dtype,
        device,
        stored_bytes(checkpoint),
    )


def load_windows(path, fingerprint, limit):
    """The c4 windows ``[n, seqlen]``, refused unless made with this tokenizer or when empty."""
    check_tokenizer(path, fingerprint)
    with safe_open(str(path), "pt") as handle:
        windows = handle.get_tensor("input_ids").long()
    windows = windows[:limit] if limit else windows
    if not len(windows):
        raise InputError(f"{path}: holds no evaluation windows")
    return windows


def load_ceval(path, fingerprint, limit):
    record = read_json(path, what="ceval evaluation set")
    check_tokenizer(path, fingerprint, record)
    questions = record["questions"][:limit] if limit else record["questions"]
    if not questions:
        raise InputError(f"{path}: holds no ceval questions")
    return questions, [record["letter_token_ids"][letter] for letter in "ABCD"]


def add_positions(metrics, logits, targets, reference):
    for first in range(0, len(targets), CHUNK):
        rows = slice(first, first + CHUNK)
        metrics.add(logits[rows], targets[rows], None if reference is None else reference[rows])


def ceval_figures(letter_logits_of, questions, letters):
    """Accuracy per subject and overall; ``letter_logits_of(ids)`` is None for a question it cannot take."""
    by_subject, skipped = {}, 0
    progress = Progress("ceval", len(questions))
    for question in questions:
        logits = letter_logits_of(question["input_ids"])
        progress.advance()
        if logits is None:
            skipped += 1
            continue
        correct, total = choice_accuracy(logits[letters].unsqueeze(0), torch.tensor(["ABCD".index(question["answer"])]))
        counts = by_subject.setdefault(question["subject"], [0, 0])
        counts[0] += correct
        counts[1] += total
    correct = sum(c for c, _ in by_subject.values())
    total = sum(t for _, t in by_subject.values())
    return {
        "accuracy": correct / total if total else None,
        "questions": total,
        "skipped": skipped,
        "subjects": {subject: {"accuracy": c / t, "questions": t} for subject, (c, t) in sorted(by_subject.items())},
    }


@dataclass(frozen=True)
class Scoring:
    """How a variant (the candidate) and the float reference give the logits of every position of a window but the
    last: eagerly, or the candidate through its compiled graphs."""

    load_candidate: Callable
    load_reference: Callable | None
    candidate_logits: Callable  # (candidate, window) -> [positions, vocab]
    reference_logits: Callable  # (reference, window) -> [positions, vocab]


def score_windows(scoring, windows, vocab_size, logits_bytes=REFERENCE_LOGITS_BYTES):
    """The c4 metrics, and the candidate, still loaded.

    One model is resident at a time: the reference's logits on a group of
    windows (at most ``logits_bytes``) are computed, the reference is freed,
    then the candidate scores the group; with several groups the two take
    turns. So a 7B int8 variant and its bf16 reference need the larger one's
    memory, not both.
    """
    metrics = TokenMetrics()
    per_group = max(1, logits_bytes // (4 * (windows.shape[1] - 1) * vocab_size))
    progress = Progress("c4 windows", len(windows))
    candidate = None
    for first in range(0, len(windows), per_group):
        group = windows[first : first + per_group]
        expected = [None] * len(group)
        if scoring.load_reference is not None:
            candidate = None
            gc.collect()
            reference = scoring.load_reference()
            expected = [scoring.reference_logits(reference, window) for window in group]
            del reference
            gc.collect()
        if candidate is None:
            candidate = scoring.load_candidate()
        for window, reference_logits in zip(group, expected, strict=True):
            logits = scoring.candidate_logits(candidate, window)
            add_positions(metrics, logits, window[1:], reference_logits)
            progress.advance()
    return metrics.figures(), candidate


def all_logits(model, window):
    return model(input_ids=window.unsqueeze(0)).logits[0, :-1]


def eager_scoring(load_candidate, load_reference):
    return Scoring(load_candidate, load_reference, all_logits, all_logits)


def eager_letter_logits(model):
    def letter_logits_of(ids):
        hidden = model.model(input_ids=torch.tensor([ids], device=model.device)).last_hidden_state[:, -1]
        return model.lm_head(hidden)[0].float().cpu()

    return letter_logits_of


def compiled_scoring(load_candidate, load_reference, windows, graphs):
    """The eager variants' positions, every one of every window, through the packages' chunked prefill."""
    if windows.shape[1] - 1 > graphs["context"]:
        raise InputError(
            f"the c4 windows have {windows.shape[1]} tokens, more than the packages' context of {graphs['context']}"
            " and one; score them with a larger aoti.context or shorter windows"
        )

    def candidate_logits(runner, window):
        return runner.prefill(runner.new_cache(rows=1), 0, window[:-1], all_logits=True)

    return Scoring(load_candidate, load_reference, candidate_logits, all_logits)


def compiled_letter_logits(runner):
    cache = runner.new_cache(rows=1)
    return lambda ids: runner.prefill(cache, 0, ids).float().cpu() if len(ids) < runner.context else None


def until_stop(tokens, stop):
    """``tokens`` up to and including the first stop token."""
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[: index + 1]
    return tokens


def generations(complete, tokenizer_folder, prompts, steps):
    """Greedy completions of ``prompts``; ``complete(ids, steps)`` returns the new token ids."""
    tokenizer = read_tokenizer(tokenizer_folder)
    samples = []
    for prompt in prompts:
        tokens = complete(tokenizer.encode(prompt).ids, steps)
        samples.append(
            {"prompt": prompt, "completion": tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens}
        )
    return samples


def eager_completer(model, stop):
    return lambda ids, steps: until_stop(greedy_decode(model, torch.tensor([ids]), steps)[1], stop)


def compiled_completer(runner, graphs):
    stop = set(graphs["stop_token_ids"])
    return lambda ids, steps: runner.generate(ids, steps, stop=stop)[0]


def logits_budget(device, folders):
    """Bytes of reference logits to hold at once: half of what the device has free beside twice the larger model
    (its float32 compute copy), at least ``REFERENCE_LOGITS_BYTES``; with memory to spare each model loads once."""
    model_bytes = max(stored_bytes(folder) for folder in folders)
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else available_memory_bytes()
    return max(REFERENCE_LOGITS_BYTES, int(free - 2 * model_bytes) // 2)


def evaluation_device(model_id, settings, package=None):
    """``evaluate.device`` for the eager variants; a compiled variant runs (with its reference) on the device its
    packages were compiled for."""
    if package is None:
        return resolve_device(settings.device, f"models.{model_id}.evaluate.device")
    compiled_for = read_json(Path(package) / GRAPHS_FILE, what="compiled graphs record").get("device", "cpu")
    if compiled_for == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"{package}: compiled for CUDA, but torch sees no CUDA device here "
            f"(models.{model_id}.evaluate.device applies to the eager variants only)"
        )
    return compiled_for


def evaluate(model_id, variant, patched, checkpoint, windows_path, ceval_path, settings, output):
    parsed = parse(variant)
    if parsed.kind == "vacc":
        raise InputError(f"model {model_id}: {variant} runs on a VACC card; evaluate scores eager and aoti variants")
    patched, checkpoint = Path(patched), Path(checkpoint)
    fingerprint = file_fingerprint(patched / TOKENIZER_FILE)
    windows = load_windows(windows_path, fingerprint, settings.c4_windows)
    questions, letters = load_ceval(ceval_path, fingerprint, settings.ceval_questions)
    torch.set_grad_enabled(False)
    compiled = parsed.kind == "aoti"
    device = evaluation_device(model_id, settings, checkpoint if compiled else None)
    dtype = resolve_dtype(settings.dtype, device)
    windows = windows.to(device)
    is_reference = parsed == Variant("eager", "float")
    load_reference = None if is_reference else lambda: load_model(patched, dtype, device)
    vocab_size = read_json(patched / "config.json", what="config")["vocab_size"]
    start = time.monotonic()
    if compiled:
        graphs = read_json(checkpoint / GRAPHS_FILE, what="compiled graphs record")
        scoring = compiled_scoring(lambda: load_compiled(checkpoint)[0], load_reference, windows, graphs)
        c4, runner = score_windows(scoring, windows, vocab_size, logits_budget(device, (patched, checkpoint)))
        ceval = ceval_figures(compiled_letter_logits(runner), questions, letters)
        complete = compiled_completer(runner, graphs)
    else:
        scoring = eager_scoring(lambda: load_model(checkpoint, dtype, device), load_reference)
        c4, model = score_windows(scoring, windows, vocab_size, logits_budget(device, (patched, checkpoint)))
        ceval = ceval_figures(eager_letter_logits(model), questions, letters)
        complete = eager_completer(model, stop_token_ids(checkpoint))
    samples = generations(complete, patched, settings.prompts, settings.generate_tokens)
    atomic_write_json(
        output,
        {
            "model": model_id,
            "variant": variant,
            "backend": parsed.kind,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "c4": {**c4, "windows": len(windows), "window_tokens": windows.shape[1]},
            "ceval": ceval,
            "generations": samples,
            "inputs": {
                "checkpoint_manifest_sha256": sha256_file(checkpoint / MANIFEST_NAME),
                "windows_sha256": sha256_file(windows_path),
                "ceval_sha256": sha256_file(ceval_path),
            },
        },
    )
    # the time goes to the log, not the result, so that a rerun of the same inputs writes the same bytes
    LOG.info(
        "model %s %s: perplexity %s, ceval accuracy %s, in %.1f s",
        model_id,
        variant,
        c4["perplexity"],
        ceval["accuracy"],
        time.monotonic() - start,
    )

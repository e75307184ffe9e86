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

Eager variants score every position of every window. The compiled graphs
take a fixed prompt (``seq_in``) and then one token per decode step up to
``seq_total``: they are scored teacher-forced on each window's positions
``seq_in .. seq_total-1``, and on the ceval questions whose prompts fit
``seq_in`` (the record says how many did not).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from workflow_scripts.checkpoint.vacc_code import load_vacc_model
from workflow_scripts.compilation.aoti_package import load_compiled
from workflow_scripts.core.cli import LOG
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json, read_json, sha256_file
from workflow_scripts.core.manifest import MANIFEST_NAME
from workflow_scripts.core.progress import Progress
from workflow_scripts.core.settings import Settings
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, file_fingerprint, read_tokenizer
from workflow_scripts.evaluation.decode import greedy_decode
from workflow_scripts.evaluation.metrics import TokenMetrics, choice_accuracy

CHUNK = 256  # positions per log-softmax, so a large vocabulary never needs one huge float64 copy


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """``models.<id>.evaluate`` less ``dataset`` (the rule's: its windows come as a file). ``None`` limits
    mean every window or question of the evaluation set."""

    dtype: str
    c4_windows: int | None
    ceval_questions: int | None
    prompts: tuple[str, ...]
    generate_tokens: int


def load_model(checkpoint, dtype):
    # every position's logits, not only the last one that the VACC prefill graph keeps
    return load_vacc_model(checkpoint, dtype, insert_slice=False)


def load_windows(path, fingerprint, limit):
    """The c4 windows ``[n, seqlen]``, refused unless made with this tokenizer or when empty."""
    with safe_open(str(path), "pt") as handle:
        made_with = handle.metadata().get("tokenizer_fingerprint")
        windows = handle.get_tensor("input_ids").long()
    if made_with != fingerprint:
        raise InputError(f"{path}: made with tokenizer {made_with}, but the model's tokenizer is {fingerprint}")
    windows = windows[:limit] if limit else windows
    if not len(windows):
        raise InputError(f"{path}: holds no evaluation windows")
    return windows


def load_ceval(path, fingerprint, limit):
    record = read_json(path, what="ceval evaluation set")
    if record["tokenizer_fingerprint"] != fingerprint:
        raise InputError(
            f"{path}: made with tokenizer {record['tokenizer_fingerprint']}, but the model's tokenizer is {fingerprint}"
        )
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


def evaluate_eager(model, reference, windows, questions, letters):
    metrics = TokenMetrics()
    progress = Progress("c4 windows", len(windows))
    for window in windows:
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids).logits[0, :-1]
        expected = None if reference is None else reference(input_ids=ids).logits[0, :-1]
        add_positions(metrics, logits, window[1:], expected)
        progress.advance()

    def letter_logits_of(ids):
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
        return model.lm_head(hidden)[0].float()

    return metrics.figures(), ceval_figures(letter_logits_of, questions, letters)


def evaluate_compiled(generator, graphs, reference, windows, questions, letters):
    seq_in, seq_total = graphs["seq_in"], graphs["seq_total"]
    if windows.shape[1] < seq_total:
        raise InputError(
            f"the c4 windows have {windows.shape[1]} tokens, fewer than the decode graph's seq_total = {seq_total}"
        )
    metrics = TokenMetrics()
    progress = Progress("c4 windows through the compiled graphs", len(windows))
    for window in windows:
        tokens = window[:seq_total].tolist()
        first, state = generator.start(tokens[:seq_in])
        logits = [first] + [generator.step(state, token) for token in tokens[seq_in : seq_total - 1]]
        expected = reference(input_ids=window[:seq_total].unsqueeze(0)).logits[0, seq_in - 1 : seq_total - 1]
        add_positions(metrics, torch.stack(logits).float(), window[seq_in:seq_total], expected)
        progress.advance()

    def letter_logits_of(ids):
        return generator.start(ids)[0].float() if len(ids) <= seq_in else None

    figures = metrics.figures()
    figures["positions_per_window"] = f"{seq_in}..{seq_total - 1}"
    return figures, ceval_figures(letter_logits_of, questions, letters)


def until_stop(tokens, stop):
    """``tokens`` up to and including the first stop token."""
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[: index + 1]
    return tokens


def stop_token_ids(folder):
    eos = read_json(Path(folder) / "config.json", what="config").get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos}


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


def compiled_completer(generator, graphs):
    stop = set(graphs["stop_token_ids"])
    return lambda ids, steps: generator.generate(ids, steps, stop=stop)[0]


def evaluate(model_id, variant, patched, checkpoint, windows_path, ceval_path, settings, output):
    patched, checkpoint = Path(patched), Path(checkpoint)
    fingerprint = file_fingerprint(patched / TOKENIZER_FILE)
    windows = load_windows(windows_path, fingerprint, settings.c4_windows)
    questions, letters = load_ceval(ceval_path, fingerprint, settings.ceval_questions)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, settings.dtype)
    compiled = variant.startswith("aoti-")
    reference = None if variant == "float" else load_model(patched, dtype)
    start = time.monotonic()
    if compiled:
        generator, _, graphs = load_compiled(checkpoint)
        c4, ceval = evaluate_compiled(generator, graphs, reference, windows, questions, letters)
        complete = compiled_completer(generator, graphs)
    else:
        model = load_model(checkpoint, dtype)
        c4, ceval = evaluate_eager(model, reference, windows, questions, letters)
        complete = eager_completer(model, stop_token_ids(checkpoint))
    samples = generations(complete, patched, settings.prompts, settings.generate_tokens)
    atomic_write_json(
        output,
        {
            "model": model_id,
            "variant": variant,
            "backend": "aoti" if compiled else "eager",
            "dtype": settings.dtype,
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

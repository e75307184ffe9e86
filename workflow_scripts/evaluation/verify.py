"""The patched checkpoint computes what upstream Mistral computes (stage 2, verify).

Upstream ``transformers.MistralForCausalLM`` is configured without a sliding
window (the patch removes it on purpose) and both models compute in float32 on
fixed prompts, one at a time so that a 7-8B model needs one model's memory (on
the CPU, where a float32 copy would take more than half the memory, held in
the checkpoint's bfloat16 and widened as it runs, which gives the same bits as
a float32 load, :mod:`workflow_scripts.core.devices`):

* the last-position logits of each prompt must agree within ``max_abs_logit_diff``;
* greedy decoding through the KV cache must produce identical token ids.

``verify.json`` records every figure; the stage fails when a check fails.
Where the model's own sliding window is shorter than a prompt, the figures
also show how far upstream *with* the window is from the patched model.
"""

import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workflow_scripts.checkpoint.vacc_code import load_vacc_model
from workflow_scripts.core.devices import load_computing_in, resolve_device, stored_bytes
from workflow_scripts.core.errors import CheckFailed
from workflow_scripts.core.files import atomic_write_json, read_json, sha256_file
from workflow_scripts.core.manifest import MANIFEST_NAME
from workflow_scripts.data.tokenizers import encode_prompts
from workflow_scripts.runtime.decode import VerifyPrompts, greedy_decode

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifySettings(VerifyPrompts):
    """``models.<id>.verify``."""

    max_abs_logit_diff: float
    device: str


def run_model(load, prompts_ids, steps, label, device, folder):
    start = time.monotonic()
    model = load_computing_in(load, torch.float32, device, stored_bytes(folder))
    LOG.info("%s loaded in %.1f s", label, time.monotonic() - start)
    results = []
    for index, ids in enumerate(prompts_ids, start=1):
        results.append(greedy_decode(model, torch.tensor([ids]), steps))
        LOG.info("%s: prompt %d/%d done (%.1f s)", label, index, len(prompts_ids), time.monotonic() - start)
    del model
    gc.collect()
    return results


def load_upstream(folder, sliding_window):
    from transformers import MistralForCausalLM

    return lambda dtype, device: MistralForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device, attn_implementation="eager", sliding_window=sliding_window
    ).eval()


def load_patched(folder):
    return lambda dtype, device: load_vacc_model(folder, dtype, device)


def compare(reference, candidate):
    """Max abs differences of prefill and decode logits, and whether the tokens agree."""
    return [
        {
            "prefill_max_abs_diff": float((ref[0][0] - cand[0][0]).abs().max()),
            "decode_max_abs_diff": float((ref[0][1:] - cand[0][1:]).abs().max()) if ref[1] == cand[1] else None,
            "tokens_identical": ref[1] == cand[1],
        }
        for ref, cand in zip(reference, candidate, strict=True)
    ]


def verify(model, patched, upstream, settings):
    prompts_ids = encode_prompts(patched, settings.prompts)
    steps = settings.greedy_tokens
    config = read_json(Path(upstream) / "config.json")
    device = resolve_device(settings.device, f"models.{model}.verify.device")
    upstream_results = run_model(
        load_upstream(upstream, None), prompts_ids, steps, "upstream (no sliding window)", device, upstream
    )
    patched_results = run_model(load_patched(patched), prompts_ids, steps, "patched", device, patched)
    per_prompt = compare(upstream_results, patched_results)
    for entry, ids, (_, tokens) in zip(per_prompt, prompts_ids, patched_results, strict=True):
        entry.update({"prompt_tokens": len(ids), "patched_tokens": tokens})

    window = config.get("sliding_window")
    longest = max(len(ids) for ids in prompts_ids) + steps
    window_effect = None
    if window is not None and window < longest:
        label = f"upstream (window {window})"
        windowed = run_model(load_upstream(upstream, window), prompts_ids, steps, label, device, upstream)
        window_effect = compare(windowed, patched_results)

    worst = max(entry["prefill_max_abs_diff"] for entry in per_prompt)
    report = {
        "model": model,
        "dtype": "float32",
        "device": device,
        "max_abs_logit_diff": worst,
        "max_abs_logit_diff_bound": settings.max_abs_logit_diff,
        "greedy_tokens": steps,
        "greedy_tokens_identical": all(entry["tokens_identical"] for entry in per_prompt),
        "prompts": per_prompt,
        "upstream_sliding_window": window,
        "windowed_upstream_vs_patched": window_effect,
        "patched_manifest_sha256": sha256_file(Path(patched) / MANIFEST_NAME),
        "passed": worst <= settings.max_abs_logit_diff and all(entry["tokens_identical"] for entry in per_prompt),
    }
    return report


def verify_checkpoint(model, patched, upstream, settings, output):
    """Verify and write the report to ``output``; a failed check raises :class:`CheckFailed` and writes nothing."""
    report = verify(model, patched, upstream, settings)
    LOG.info(
        "model %s: max |logit diff| %.3g (bound %.3g), greedy tokens identical: %s",
        model,
        report["max_abs_logit_diff"],
        report["max_abs_logit_diff_bound"],
        report["greedy_tokens_identical"],
    )
    if not report["passed"]:
        LOG.error("verification report:\n%s", json.dumps(report, indent=2))
        raise CheckFailed(
            f"model {model}: the patched checkpoint {patched} does not match upstream "
            f"Mistral: max |logit diff| {report['max_abs_logit_diff']:.3g} (bound "
            f"{report['max_abs_logit_diff_bound']:.3g}), greedy tokens identical: "
            f"{report['greedy_tokens_identical']}"
        )
    atomic_write_json(output, report)

"""The serving benchmark's prompts: texts of real words that the served tokenizer encodes as exactly the asked
number of tokens, different for every request from their first word, so that no prefix cache serves them."""

import random
import re

from workflow_scripts.core.errors import InputError

# Fewer distinct words than this and the prompts would repeat each other too much to defeat a prefix cache.
MIN_WORDS = 100
WORD = re.compile(r" [A-Za-z]{2,}")


def single_token_words(tokenizer, probe="the"):
    """Words that each add exactly one token when they follow another word and a space: the vocabulary's
    tokens that decode to a space and letters, kept when the tokenizer encodes them back as one token."""
    probe_ids = tokenizer.encode(probe, add_special_tokens=False).ids
    probe_text = tokenizer.decode(probe_ids)
    decoded = tokenizer.decode_batch([[*probe_ids, token] for token in range(tokenizer.get_vocab_size())])
    candidates = sorted(
        {
            text[len(probe_text) + 1 :]
            for text in decoded
            if text.startswith(probe_text) and WORD.fullmatch(text[len(probe_text) :])
        }
    )
    encoded = tokenizer.encode_batch([f"{probe} {word}" for word in candidates], add_special_tokens=False)
    words = [
        word for word, encoding in zip(candidates, encoded, strict=True) if len(encoding.ids) == len(probe_ids) + 1
    ]
    if len(words) < MIN_WORDS:
        raise InputError(
            f"the tokenizer has {len(words)} words that encode as one token each, fewer than the {MIN_WORDS} "
            "the benchmark's prompts are made of"
        )
    return words


def exact_prompt(tokenizer, words, tokens, rng, attempts=8):
    """A text of random ``words`` that the server encodes (special tokens included) as exactly ``tokens`` ids."""
    specials = len(tokenizer.encode("").ids)
    for _ in range(attempts):
        chosen = rng.choices(words, k=tokens + 16)
        count = tokens - specials
        # each word is one token, so this converges at once unless neighbouring words merge
        for _ in range(8):
            if not 1 <= count <= len(chosen):
                break
            text = " ".join(chosen[:count])
            encoded = len(tokenizer.encode(text).ids)
            if encoded == tokens:
                return text
            count += tokens - encoded
    raise InputError(
        f"cannot make a prompt of exactly {tokens} tokens with this tokenizer (it adds {specials} special "
        "token(s) of its own)"
    )


def case_prompts(tokenizer, words, cases, settings):
    """Every case's prompts, made before the first request so that a length the tokenizer cannot make stops the
    run before it starts, and no prompt is built inside a timed case."""
    rng = random.Random(settings.seed)
    return [
        [exact_prompt(tokenizer, words, case.input_tokens, rng) for _ in range(case.requests(settings))]
        for case in cases
    ]


def warmup_prompts(tokenizer, words, cases, settings):
    """``settings.warmup_requests`` prompts of the first case's length, drawn apart from the sweep's own."""
    rng = random.Random(f"warm-up {settings.seed}")
    return [exact_prompt(tokenizer, words, case.input_tokens, rng) for case in cases[:1] * settings.warmup_requests]

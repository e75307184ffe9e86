"""Tokenizers: a model's ``tokenizer.json``, its fingerprint, and encoding text and prompts with it.

A tokenizer is named by its fingerprint, the first 16 hex digits of its file's
sha256: models that share one share their calibration shards and evaluation sets.
"""

from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import sha256_file

TOKENIZER_FILE = "tokenizer.json"


def fingerprint(sha256):
    """The fingerprint of a tokenizer file whose sha256 (hex) is ``sha256``."""
    return sha256[:16]


def file_fingerprint(path):
    return fingerprint(sha256_file(path))


def tokenizer_fingerprint(manifest, owner):
    """Fingerprint of the tokenizer listed in a checkpoint's download manifest."""
    entry = manifest["files"].get(TOKENIZER_FILE)
    if entry is None:
        raise InputError(f"{owner}: the checkpoint has no {TOKENIZER_FILE} (a fast tokenizer is required)")
    return fingerprint(entry["sha256"])


def read_tokenizer(folder):
    """The fast tokenizer of a checkpoint or compiled package folder."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))


def encode_prompts(folder, prompts, limit=None):
    """Token ids of each prompt as the model reads it (special tokens added).

    ``limit``: ``(max_tokens, prompts_key, limit_key)``; a longer prompt is an input error naming both keys.
    """
    tokenizer = read_tokenizer(folder)
    encoded = [tokenizer.encode(prompt).ids for prompt in prompts]
    if limit is not None:
        max_tokens, prompts_key, limit_key = limit
        for index, ids in enumerate(encoded):
            if len(ids) > max_tokens:
                raise InputError(
                    f"config: {prompts_key}[{index}] has {len(ids)} tokens, more than {limit_key} = {max_tokens}"
                )
    return encoded


def load_tokenizer(folder, fingerprint):
    """The fast tokenizer of ``folder``, refused unless its file has ``fingerprint``."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist (a fast tokenizer is required)")
    actual = file_fingerprint(path)
    if actual != fingerprint:
        raise InputError(f"{path} has fingerprint {actual}, not the requested {fingerprint}")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode(tokenizer, texts):
    return [encoding.ids for encoding in tokenizer.encode_batch_fast(texts)]


def pad_token_id(tokenizer):
    """The tokenizer's pad token, else its unknown token, else 0: padded positions are masked anyway."""
    for token in ("<pad>", "<unk>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0

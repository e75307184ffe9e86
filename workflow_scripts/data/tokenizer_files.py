"""Real Mistral tokenizers from the ``mistral-common`` package, saved as Hugging Face tokenizers.

The demo checkpoints carry the tokenizers of the real models: the v1
SentencePiece model (Mistral-7B v0.1/v0.2) and the Tekken tokenizer of the
2024-09 generation (Ministral-8B-2410). Each is written the way the hub repos
ship it: the native file plus ``tokenizer.json`` and ``tokenizer_config.json``.
"""

import shutil
from pathlib import Path

import mistral_common
from tokenizers import normalizers, processors

from workflow_scripts.core.files import atomic_write_json

MISTRAL_COMMON_DATA = Path(mistral_common.__file__).parent / "data"
# Chat templates that give the token ids mistral-common's own chat encoding gives (tests/test_serving.py):
# v1 spaces its [INST] markers and puts the system prompt before the first user turn, Tekken writes them as
# control tokens without spaces and puts it before the last one.
CHAT_TURNS = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content')"
    " | join('\\n\\n') -%}"
    "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for message in turns -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user/assistant/user/... after an optional system message') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set with_system = system and loop.index0 == SYSTEM_TURN -%}"
    "{{- OPEN + (system + '\\n\\n' if with_system else '') + message['content'] + CLOSE -}}"
    "{%- else -%}"
    "{{- ANSWER + message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def chat_template(open_marker, close_marker, answer_prefix, system_turn):
    return (
        CHAT_TURNS.replace("OPEN", repr(open_marker))
        .replace("CLOSE", repr(close_marker))
        .replace("ANSWER", repr(answer_prefix))
        .replace("SYSTEM_TURN", system_turn)
    )


TOKENIZERS = {
    "sentencepiece-v1": {
        "source": "tokenizer.model.v1",
        "native_name": "tokenizer.model",
        "chat_template": chat_template("[INST] ", " [/INST]", " ", "0"),
    },
    "tekken-240911": {
        "source": "tekken_240911.json",
        "native_name": "tekken.json",
        "chat_template": chat_template("[INST]", "[/INST]", "", "ns.last_user"),
    },
}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _backend_tokenizer(kind, native_path):
    if kind == "sentencepiece-v1":
        from transformers import LlamaTokenizer

        backend = LlamaTokenizer.from_pretrained(native_path.parent).backend_tokenizer
        # As in the hub's own Mistral-7B tokenizer.json: SentencePiece's dummy
        # prefix and space marking as a normalizer, which (unlike a Metaspace
        # pre-tokenizer) also matches SentencePiece on text that starts with spaces.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
        return backend
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    return convert_tekken_tokenizer(str(native_path), chat_template="").backend_tokenizer


def write_tokenizer(kind, folder):
    """Write tokenizer ``kind`` into ``folder``; return the names of the files written."""
    spec = TOKENIZERS[kind]
    folder = Path(folder)
    native = folder / spec["native_name"]
    shutil.copyfile(MISTRAL_COMMON_DATA / spec["source"], native)
    backend = _backend_tokenizer(kind, native)
    bos_id = backend.token_to_id(SPECIAL_TOKENS["bos_token"])
    # Both hub repos prepend BOS when encoding, as mistral-common does.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos_token']} $A",
        pair=f"{SPECIAL_TOKENS['bos_token']} $A {SPECIAL_TOKENS['bos_token']} $B",
        special_tokens=[(SPECIAL_TOKENS["bos_token"], bos_id)],
    )
    backend.save(str(folder / "tokenizer.json"))
    atomic_write_json(
        folder / "tokenizer_config.json",
        {
            # The generic class loads tokenizer.json as written; transformers 5's
            # LlamaTokenizer would rebuild the normalizer from its own defaults.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 32768,
            "chat_template": spec["chat_template"],
            **SPECIAL_TOKENS,
        },
    )
    return [native.name, "tokenizer.json", "tokenizer_config.json"]

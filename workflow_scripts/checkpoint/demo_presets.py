"""The demo models' shapes, without torch, so that the Snakefile can size their jobs."""

from workflow_scripts.checkpoint.layout import MISTRAL_CONFIG

# Shapes keep the real models' ratios: GQA 4:1, MLP 3.5x (Mistral) or 3x
# (Ministral) the hidden size, Ministral's explicit head_dim (chosen here unequal
# to hidden/heads so that code assuming hidden/heads fails), the real
# vocabularies and rope bases. demo-mistral's sliding window is shorter than the
# verification prompts, so the patch that removes it changes results.
PRESETS = {
    "mistral": {
        "tokenizer": "sentencepiece-v1",
        "config": {
            "vocab_size": 32000,
            "hidden_size": 128,
            "intermediate_size": 448,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rope_theta": 1000000.0,
            "sliding_window": 32,
        },
    },
    "ministral": {
        "tokenizer": "tekken-240911",
        "config": {
            "vocab_size": 131072,
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rope_theta": 100000000.0,
            "sliding_window": 32768,
        },
    },
}
COMMON_CONFIG = {
    **MISTRAL_CONFIG,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}


def demo_config(preset, overrides=None):
    """The hub-style ``config.json`` of a preset, with optional shape overrides."""
    return {**COMMON_CONFIG, **PRESETS[preset]["config"], **(overrides or {})}

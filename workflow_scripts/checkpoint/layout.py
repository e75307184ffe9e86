"""The tensors of a Hugging Face ``MistralForCausalLM`` checkpoint, derived from its config (a ``config.json`` dict)."""

import math

# The config.json keys of every MistralForCausalLM the workflow writes (a demo preset, a GGUF import), beside its
# shape, special tokens and limits
MISTRAL_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}


def head_dim(config):
    """Ministral sets ``head_dim`` (unequal to hidden / heads); Mistral-7B leaves it out (or null)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def parameter_count(config, prefix=""):
    """Parameters of the model, or of the tensors whose names start with ``prefix``."""
    return sum(math.prod(shape) for name, shape in tensor_shapes(config).items() if name.startswith(prefix))


def tensor_shapes(config):
    """HF tensor names and shapes of a ``MistralForCausalLM``, in file order.

    A model with tied embeddings has no ``lm_head.weight``: its output projection is ``embed_tokens``.
    """
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_out = config["num_attention_heads"] * head_dim(config)
    kv_out = config["num_key_value_heads"] * head_dim(config)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes.update(
            {
                f"{prefix}.input_layernorm.weight": (hidden,),
                f"{prefix}.self_attn.q_proj.weight": (q_out, hidden),
                f"{prefix}.self_attn.k_proj.weight": (kv_out, hidden),
                f"{prefix}.self_attn.v_proj.weight": (kv_out, hidden),
                f"{prefix}.self_attn.o_proj.weight": (hidden, q_out),
                f"{prefix}.post_attention_layernorm.weight": (hidden,),
                f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
                f"{prefix}.mlp.up_proj.weight": (inter, hidden),
                f"{prefix}.mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes

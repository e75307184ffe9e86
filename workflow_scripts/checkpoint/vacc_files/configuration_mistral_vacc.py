"""Mistral configuration for the VACC static-graph model.

Shipped inside the patched checkpoint. It imports the installed
``transformers`` package (never relative into it), so the same file loads under
the vendor's transformers 4.45 and under current releases.
"""

from transformers import PretrainedConfig


class MistralConfig(PretrainedConfig):
    """The upstream Mistral keys plus ``insert_slice`` and ``iter_num``.

    ``insert_slice`` cuts the prefill output to the last position before
    ``lm_head``; ``iter_num`` is 0 for the prefill graph and 1 for decode.
    ``sliding_window`` is kept so the file round-trips, but the VACC model never
    reads it: attention is always full causal. ``vacc_quantization`` (scheme,
    bits, granularity, modules) marks a checkpoint whose projections are int8.
    """

    model_type = "mistral"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_parameters=None,
        sliding_window=None,
        attention_dropout=0.0,
        insert_slice=False,
        iter_num=0,
        vacc_quantization=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        # Newer transformers releases write the base as rope_parameters.rope_theta.
        if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
            rope_theta = rope_parameters["rope_theta"]
        self.rope_theta = float(rope_theta)
        self.sliding_window = sliding_window
        self.attention_dropout = attention_dropout
        self.insert_slice = bool(insert_slice)
        self.iter_num = int(iter_num)
        self.vacc_quantization = vacc_quantization
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

"""Configuration of a fusion_titan export (hybrid MLA + DeepSeekMoE / Gated DeltaNet decoder).

Written by fusion_titan's `scripts/convert_checkpoint.py dcp-to-hf`. `fusion_model_args` holds
the exact architecture arguments of the model (fusion_titan's FusionModelArgs); the usual Hugging
Face keys (hidden_size, num_hidden_layers, ...) are there for tools that read them.
"""

from transformers import PretrainedConfig


class FusionConfig(PretrainedConfig):
    model_type = "fusion_titan"

    def __init__(self, fusion_model_args: dict | None = None, rope_interleave: bool = True,
                 **kwargs):
        self.fusion_model_args = dict(fusion_model_args or {})
        self.rope_interleave = rope_interleave
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("use_cache", False)  # no KV cache: generate() recomputes the prefix
        super().__init__(**kwargs)

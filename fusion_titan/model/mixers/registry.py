"""The table of token-mixer kinds that `[model] layer_pattern` names.

A mixer is an nn.Module with

    forward(x [B, T, dim], rope=None, cache=None, document_ids=None) -> [B, T, dim]
        rope:          the model's shared rope table (MLA uses it; mixers with their own RoPE
                       settings own their table and ignore it)
        cache:         this layer's decoding cache from new_cache(), updated in place; x is then
                       the next chunk of the sequence
        document_ids:  [B, T] packed-document ids: no token mixes with another document
    new_cache(batch_size, dtype=None, device=None) -> a fresh (empty) decoding cache
    init_weights(std, out_std)   std for input-side matrices, out_std for the residual output

Each mixer module registers its kind with `register_mixer`, giving the builder (from the model
args), its family ("attention" mixers get the MoE FFN by default, "recurrent" ones a dense
SwiGLU) and its sequence-mixing FLOPs per token (training, forward + backward, the part that has
no parameters: fusion_titan/model/flops.py adds the matmuls).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

FAMILIES = ("attention", "recurrent")


@dataclass(frozen=True)
class MixerKind:
    name: str
    build: Callable[..., nn.Module]  # (FusionModelArgs) -> mixer
    family: str
    flops_per_token: Callable[..., float]  # (FusionModelArgs, seq_len) -> FLOPs


MIXERS: dict[str, MixerKind] = {}


def register_mixer(name: str, family: str, flops_per_token: Callable[..., float]):
    """Decorator for a builder `args -> mixer`: makes `name` usable in layer patterns."""
    if family not in FAMILIES:
        raise ValueError(f"mixer family {family!r} must be one of {FAMILIES}")

    def register(build: Callable[..., nn.Module]):
        if name in MIXERS:
            raise ValueError(f"mixer kind {name!r} is registered twice")
        MIXERS[name] = MixerKind(name, build, family, flops_per_token)
        return build

    return register


def mixer_kind(name: str) -> MixerKind:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer kind {name!r}; valid kinds: {sorted(MIXERS)}")
    return MIXERS[name]

"""Feed-forward kinds a block can carry (`mla+moe`, `gdn+dense` in a layer pattern)."""

from __future__ import annotations

import torch.nn as nn

from torchtitan.models.moe.moe import FeedForward

from .moe import DeepSeekMoE


def build_moe(args) -> DeepSeekMoE:
    if args.n_routed_experts <= 0:
        raise ValueError("a '+moe' block needs n_routed_experts > 0 ([model] n_routed_experts)")
    return DeepSeekMoE.from_args(args)


def build_dense(args) -> nn.Module:
    """SwiGLU of width ffn_hidden_dim (torchtitan's FeedForward: w2(silu(w1 x) * w3 x))."""
    return FeedForward(args.dim, args.ffn_hidden_dim)


FFNS = {"moe": build_moe, "dense": build_dense}


def default_ffn(family: str, args) -> str:
    """Attention-type mixers get the MoE FFN when the model has routed experts; the rest dense."""
    return "moe" if family == "attention" and args.n_routed_experts > 0 else "dense"

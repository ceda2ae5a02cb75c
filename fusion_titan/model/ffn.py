"""Feed-forward kinds a block can carry (`mla+moe`, `gdn+dense` in a layer pattern)."""

from __future__ import annotations

import torch
import torch.nn as nn

from torchtitan.models.moe.moe import FeedForward

from .moe import DeepSeekMoE


def build_moe(args) -> DeepSeekMoE:
    if args.n_routed_experts <= 0:
        raise ValueError("a '+moe' block needs n_routed_experts > 0 ([model] n_routed_experts)")
    return DeepSeekMoE(
        args.dim, args.n_routed_experts, args.n_activated_experts, args.n_shared_experts,
        args.moe_inter_dim, args.n_expert_groups, args.n_limited_groups, args.route_scale,
        args.moe_bias_update_rate, use_grouped_mm=args.use_grouped_mm and torch.cuda.is_available(),
        seq_aux_loss_weight=args.moe_seq_aux_weight, capacity_factor=args.moe_capacity_factor,
        dispatch=args.moe_dispatch, group_align=args.moe_group_align,
    )


def build_dense(args) -> nn.Module:
    """SwiGLU of width ffn_hidden_dim (torchtitan's FeedForward: w2(silu(w1 x) * w3 x))."""
    return FeedForward(args.dim, args.ffn_hidden_dim)


FFNS = {"moe": build_moe, "dense": build_dense}


def default_ffn(family: str, args) -> str:
    """Attention-type mixers get the MoE FFN when the model has routed experts; the rest dense."""
    return "moe" if family == "attention" and args.n_routed_experts > 0 else "dense"

"""One pre-norm residual block of the hybrid trunk: a token mixer then a feed-forward.

kind "attn": Multi-head Latent Attention + DeepSeekMoE (dense SwiGLU when n_routed_experts = 0).
kind "gdn":  Gated DeltaNet (or Mamba-2 when ssm_type = "mamba2") + dense SwiGLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from torchtitan.models.moe.moe import FeedForward

from .args import FusionModelArgs
from .gated_deltanet import GatedDeltaNet
from .mamba2 import Mamba2
from .mla import MultiHeadLatentAttention
from .moe import DeepSeekMoE


def init_stds(args: FusionModelArgs) -> tuple[float, float]:
    """(std of input-side matrices, std of residual-output matrices) in the muP base model.

    Residual outputs are scaled by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream's scale
    does not grow with depth. muP's per-matrix width scaling is applied afterwards, by
    FusionModel.init_weights (fusion_titan/model/mup.py): every matrix here is drawn as the base
    model would draw it.
    """
    return args.init_std, args.init_std / math.sqrt(2 * args.n_layers)


class FusionBlock(nn.Module):
    def __init__(self, kind: str, args: FusionModelArgs, use_moe: bool | None = None):
        super().__init__()
        self.kind = kind
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if kind == "attn":
            self.mixer = MultiHeadLatentAttention(args)
        elif kind == "gdn" and args.ssm_type == "mamba2":
            self.mixer = Mamba2(
                args.dim, n_heads=2 * args.dim // args.mamba_head_dim, head_dim=args.mamba_head_dim,
                d_state=args.mamba_d_state, conv_size=args.gdn_conv_size, norm_eps=args.norm_eps,
            )
        elif kind == "gdn":
            self.mixer = GatedDeltaNet(
                args.dim, args.gdn_n_heads, head_k_dim=args.gdn_head_k_dim,
                head_v_dim=args.gdn_head_v_dim, conv_size=args.gdn_conv_size,
                norm_eps=args.norm_eps, backend=args.gdn_backend,
            )
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        if use_moe is None:
            use_moe = kind == "attn" and args.n_routed_experts > 0
        # `moe_enabled` / `moe` are the names torchtitan's MoE helpers look for.
        self.moe_enabled = use_moe
        if use_moe:
            self.moe = DeepSeekMoE.from_args(args)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim].

        `cache` (decoding only) is this block's mixer cache: an MLACache for kind "attn" (x is then
        the next chunk after cache.length; MLA takes its rope positions from the cache), a
        GDNCache / Mamba2Cache for kind "gdn". It is updated in place. The FFN / MoE is per-token
        and needs none. See fusion_titan.model.decoding.

        `document_ids` [B, T] (training on packed documents): no token mixes with another
        document — attention is masked, the recurrent mixer restarts at each boundary.
        """
        h = self.attention_norm(x)
        if cache is None:
            mixed = (self.mixer(h, rope, document_ids=document_ids) if self.kind == "attn"
                     else self.mixer(h, document_ids=document_ids))
        elif self.kind == "attn":
            mixed = self.mixer(h, rope, cache=cache)
        else:
            mixed = self.mixer(h, cache)
        x = x + mixed
        h = self.ffn_norm(x)
        return x + (self.moe(h) if self.moe_enabled else self.feed_forward(h))

    def init_weights(self, args: FusionModelArgs, buffer_device: torch.device | None = None) -> None:
        std, out_std = init_stds(args)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.mixer.init_weights(std, out_std)
        if self.moe_enabled:
            self.moe.init_weights(std, out_std, buffer_device)
        else:
            for lin, s in ((self.feed_forward.w1, std), (self.feed_forward.w3, std),
                           (self.feed_forward.w2, out_std)):
                nn.init.trunc_normal_(lin.weight, std=s, a=-3 * s, b=3 * s)

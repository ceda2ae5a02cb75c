"""Multi-token prediction modules (DeepSeek-V3 §2.2), applied sequentially.

Module k (1-based) predicts token t+k+1 at position t. It concatenates the RMS-normalized hidden
state of depth k-1 with the RMS-normalized embedding of token t+k, projects 2*dim -> dim, runs one
block and a final norm; the embedding table and the output head are shared with the trunk. The
sequence shrinks by one position per depth, so no token beyond the sample is needed.
Our MTP blocks use MLA + a dense FFN: they are training-only, so we keep them cheap. They keep a
single stream (plain residual) under `residual = "hyper"`: their input is the trunk's summed
streams, and widening a one-block head would add little. `residual = "scaled"` applies to them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .args import FusionModelArgs
from .blocks import FusionBlock, init_stds
from .layer_pattern import LayerSpec
from .residual import MULTI_STREAM


class MTPModule(nn.Module):
    def __init__(self, args: FusionModelArgs):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.embed_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        block_args = args.replace(residual="plain") if args.residual in MULTI_STREAM else args
        self.block = FusionBlock(LayerSpec("mla", "dense"), block_args)
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, rope: torch.Tensor,
                document_ids: torch.Tensor | None = None):
        """hidden [B, T', D] (depth k-1, unnormalized), next_embeds [B, T', D] -> (new hidden, normed).

        document_ids [B, T'] are those of the hidden positions (intra-document masking)."""
        h = self.proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(next_embeds)], dim=-1))
        h = self.block(h, rope, document_ids=document_ids)
        return h, self.norm(h)

    def init_weights(self, args: FusionModelArgs, buffer_device=None) -> None:
        std, _ = init_stds(args)
        for norm in (self.hidden_norm, self.embed_norm, self.norm):
            norm.reset_parameters()
        nn.init.trunc_normal_(self.proj.weight, std=std, a=-3 * std, b=3 * std)
        self.block.init_weights(args, buffer_device)

"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1).

Queries go through a low-rank bottleneck (q_lora_rank, RMSNorm on the latent); keys and values
share one compressed latent c_kv (kv_lora_rank, RMSNorm) that is what a decoder caches. RoPE is
decoupled: a separate rope slice of each query head and ONE rope key shared by all heads, so the
cache holds kv_lora_rank + qk_rope_head_dim numbers per token instead of 2 * n_heads * head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.attention import causal_attention
from .args import FusionModelArgs
from .rope import apply_rope


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: FusionModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.window = args.sliding_window
        self.backend = args.attn_backend
        qk_head_dim = self.nope_dim + self.rope_dim
        # The softmax temperature covers both the nope and the rope part of each head.
        self.softmax_scale = 1.0 / math.sqrt(qk_head_dim)

        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, self.n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_head_dim), bias=False
        )
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, args.dim, bias=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank > 0 else self.wq(x)
        return q.view(bsz, seqlen, self.n_heads, self.nope_dim + self.rope_dim)

    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token cache entry: normalized latent c_kv [B,T,kv_lora] and raw rope key [B,T,rope]."""
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), k_rope

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.queries(x)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, rope)

        c_kv, k_rope = self.compress(x)
        k_rope = apply_rope(k_rope.unsqueeze(2), rope)  # one rope key shared by all heads
        kv = self.wkv_b(c_kv).view(bsz, seqlen, self.n_heads, self.nope_dim + self.v_head_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)

        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)
        out = causal_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            scale=self.softmax_scale, window=self.window, backend=self.backend,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def input_projections(self) -> list[nn.Linear]:
        if self.q_lora_rank > 0:
            return [self.wq_a, self.wq_b, self.wkv_a, self.wkv_b]
        return [self.wq, self.wkv_a, self.wkv_b]

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in self.input_projections():
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        for norm in (getattr(self, "q_norm", None), self.kv_norm):
            if norm is not None:
                norm.reset_parameters()

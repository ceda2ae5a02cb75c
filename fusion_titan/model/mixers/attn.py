"""Softmax attention: the `attn` (full causal) and `swa` (sliding window) mixers, and the pieces
other attention-type mixers reuse (`QKVProjection`, `PartialRope`, `KVCache`, `SoftmaxAttention`).

Projections (`QKVProjection`): q = W_Q x with n_heads heads, k = W_K x and v = W_V x with
n_kv_heads heads (GQA, Ainslie et al. 2023: query head h reads kv head h // (n_heads /
n_kv_heads); n_kv_heads = n_heads is MHA), every head head_dim wide, no biases.
QK-norm (`qk_norm`, Qwen3 / OLMo-2 style, Dehghani et al. 2023): RMSNorm over each head's
head_dim on q and on k, one learned weight shared by the heads, before RoPE.

Partial RoPE (`PartialRope`): the first rope_dim = rope_fraction * head_dim dims of every q / k
head are rotated (rotate-half within that slice, as GPT-NeoX's rotary_pct), the rest carry no
position; rope_fraction 0 = no positional encoding (NoPE), 1 = ordinary RoPE. Its own theta
(`attn_rope_theta`); the mixer owns the table (a non-persistent buffer, recomputed by
init_weights so a meta-device build gets a real one) and ignores the model's MLA rope table.

Gates (`attn_gate`), both a sigmoid of a learned projection W_G x of the block input (the normed
hidden state the mixer receives), elementwise per head channel, no bias (sigma = 0.5 at init):
  "output"  o_h <- o_h * sigma(W_G x)_h on each head's attention output, before W_O: the gated
            attention of Qwen3-Next (Qiu et al. 2025, "Gated Attention for Large Language
            Models", the SDPA-output elementwise gate).
  "query"   q_h <- q_h * sigma(W_G x)_h after QK-norm (which would otherwise normalize the gate
            away) and before RoPE (so the score still depends on positions only through their
            difference).
  "none"    no gate.

Scale 1 / sqrt(head_dim). The attention itself is fusion_titan/ops/attention.py (SDPA /
FlexAttention / flash-attn / reference; windows and document masks).

Decoding: `forward(x, cache=KVCache)` rotates this chunk's keys at positions cache.length ..,
appends keys and values to the cache and attends over everything kept. `swa` keeps only the
last `attn_window` tokens (older ones can never be attended again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...ops.attention import causal_attention
from ..args import FusionModelArgs
from ..flops import average_keys_per_query
from ..rope import apply_rope, rope_cache
from .registry import register_mixer

GATES = ("none", "output", "query")


@dataclass
class KVCache:
    """Per-layer decoding cache of a softmax-attention mixer: rotated keys and values.

    k      [B, H_kv, S, D_k]  keys of the S kept tokens, RoPE already applied
    v      [B, H_kv, S, D_v]
    length tokens seen so far = absolute position of the next token; with keep-last-W trimming
           (sliding window) S = min(length, W).

    Appending concatenates (O(S) copy per step): a reference decoder, not a paged serving cache.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, k_dim: int, v_dim: int,
              dtype: torch.dtype = torch.float32, device=None) -> "KVCache":
        return cls(torch.empty(batch, n_kv_heads, 0, k_dim, dtype=dtype, device=device),
                   torch.empty(batch, n_kv_heads, 0, v_dim, dtype=dtype, device=device))

    @property
    def start(self) -> int:
        """Absolute position of the oldest kept token."""
        return self.length - self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, keep_last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a chunk k/v [B, H_kv, T, D]; return kept + new keys and values to attend over, then
        keep only the last `keep_last` tokens (0 = keep all)."""
        all_k = torch.cat([self.k, k.to(self.k.dtype)], dim=2)
        all_v = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        self.length += k.shape[2]
        if keep_last > 0 and all_k.shape[2] > keep_last:
            self.k, self.v = all_k[:, :, -keep_last:].clone(), all_v[:, :, -keep_last:].clone()
        else:
            self.k, self.v = all_k, all_v
        return all_k, all_v

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PartialRope(nn.Module):
    """RoPE on the first rope_fraction of each head's dims, with its own theta and table."""

    def __init__(self, head_dim: int, rope_fraction: float, theta: float, max_seq_len: int):
        super().__init__()
        rope_dim = head_dim * rope_fraction
        if not 0.0 <= rope_fraction <= 1.0 or rope_dim != int(rope_dim) or int(rope_dim) % 2:
            raise ValueError(
                f"rope_fraction {rope_fraction} of head_dim {head_dim} must be in [0, 1] and give an "
                f"even number of rotated dims (got {rope_dim}); e.g. 0.5 or 0.25 with head_dim 128"
            )
        self.rope_dim = int(rope_dim)
        self.theta = theta
        self.max_seq_len = max_seq_len
        self.register_buffer("table", self._table(), persistent=False)

    def _table(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.rope_dim == 0:
            return torch.empty(self.max_seq_len, 0, device=device, dtype=dtype)
        return rope_cache(self.rope_dim, self.max_seq_len, self.theta, device=device, dtype=dtype)

    def reset_table(self) -> None:
        """Recompute the table where it lives (after a meta-device build and to_empty); float64
        models get a float64 table, everything else float32."""
        dtype = torch.float64 if self.table.dtype == torch.float64 else torch.float32
        self.table = self._table(device=self.table.device, dtype=dtype)

    def forward(self, x: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H, D] at positions start_pos .. start_pos + T - 1, or at `positions` [T] when
        given (csa rotates its compressed keys at each block's last position)."""
        if self.rope_dim == 0:
            return x
        rotated = apply_rope(x[..., : self.rope_dim], self.table, positions=positions, start_pos=start_pos)
        return torch.cat([rotated, x[..., self.rope_dim:]], dim=-1)


class QKVProjection(nn.Module):
    """x [B, T, dim] -> q [B, T, H, D], k and v [B, T, H_kv, D] (GQA), q and k RMS-normed per head
    when qk_norm. Not rotated: RoPE (and a query gate) come after."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: bool,
                 norm_eps: float = 1e-6):
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}); "
                             "set [model] n_kv_heads to a divisor (0 = n_heads, MHA)")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v before QK-norm (csa compresses the raw keys)."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        return q, k, v

    def norm_q(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.q_norm is None else self.q_norm(q)

    def norm_k(self, k: torch.Tensor) -> torch.Tensor:
        return k if self.k_norm is None else self.k_norm(k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.project(x)
        return self.norm_q(q), self.norm_k(k), v

    def init_weights(self, std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


def attention_heads(args: FusionModelArgs) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of the softmax-attention mixers (n_kv_heads 0 = n_heads)."""
    return args.n_heads, args.n_kv_heads or args.n_heads, args.head_dim


class SoftmaxAttention(nn.Module):
    """Causal softmax attention (GQA, QK-norm, gate, partial RoPE); `window` > 0 = sliding window.

    Subclasses change the mask by overriding `attend` (and `cache_keep_last`)."""

    def __init__(self, args: FusionModelArgs, window: int = 0):
        super().__init__()
        if args.attn_gate not in GATES:
            raise ValueError(f"attn_gate {args.attn_gate!r} must be one of {GATES}")
        self.n_heads, self.n_kv_heads, self.head_dim = attention_heads(args)
        self.window = window
        self.backend = args.attn_backend
        self.gate = args.attn_gate
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = QKVProjection(args.dim, self.n_heads, self.n_kv_heads, self.head_dim,
                                 args.qk_norm, args.norm_eps)
        self.rope = PartialRope(self.head_dim, args.rope_fraction, args.attn_rope_theta, args.max_seq_len)
        self.w_gate = (nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
                       if self.gate != "none" else None)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    @property
    def cache_keep_last(self) -> int:
        """Tokens a decoding cache must keep (0 = all)."""
        return max(self.window, 0)

    def attend(self, q, k, v, document_ids=None, backend: str | None = None) -> torch.Tensor:
        """q [B, H, Tq, D], k / v [B, H_kv, Tk, D] (queries = the last Tq keys) -> [B, H, Tq, D]."""
        return causal_attention(q, k, v, scale=self.softmax_scale, window=self.window,
                                backend=backend or self.backend, document_ids=document_ids)

    def _sigmoid_gate(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        return torch.sigmoid(self.w_gate(x)).view(bsz, seqlen, self.n_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]. `rope` (the model's MLA table) is ignored: this mixer
        owns its table. With a cache, x continues the cached sequence (positions cache.length ..)."""
        bsz, seqlen, _ = x.shape
        if cache is not None and document_ids is not None:
            raise NotImplementedError("document masks are not supported with a decoding cache")
        start = cache.length if cache is not None else 0
        q, k, v = self.qkv(x)
        if self.gate == "query":
            q = q * self._sigmoid_gate(x)
        q, k = self.rope(q, start), self.rope(k, start)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        backend = self.backend
        if cache is not None:
            k, v = cache.append(k, v, keep_last=self.cache_keep_last)
            k, v = k.to(q.dtype), v.to(q.dtype)
            # every decode step has a new key length: a dense SDPA mask, not a FlexAttention
            # BlockMask (and a recompile) per step
            backend = "sdpa" if backend == "auto" else backend
        out = self.attend(q, k, v, document_ids, backend).transpose(1, 2)  # [B, T, H, D]
        if self.gate == "output":
            out = out * self._sigmoid_gate(x)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        w = self.qkv.wk.weight
        return KVCache.empty(batch_size, self.n_kv_heads, self.head_dim, self.head_dim,
                             dtype=dtype or w.dtype, device=device or w.device)

    def init_weights(self, std: float, out_std: float) -> None:
        self.qkv.init_weights(std)
        if self.w_gate is not None:
            nn.init.trunc_normal_(self.w_gate.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        self.rope.reset_table()


def softmax_attention_flops(args, keys_per_query: float) -> float:
    """Scores (q.k) and weighted values: 2 * head_dim FLOPs each per (query head, key) pair, so
    4 * n_heads * head_dim per key a query sees; x3 for forward + backward. GQA shares K/V, not
    this work."""
    return 3 * 4 * args.n_heads * args.head_dim * keys_per_query


def attn_flops_per_token(args, seq_len: int) -> float:
    return softmax_attention_flops(args, average_keys_per_query(seq_len, 0))


def swa_flops_per_token(args, seq_len: int) -> float:
    return softmax_attention_flops(args, average_keys_per_query(seq_len, args.attn_window))


@register_mixer("attn", family="attention", flops_per_token=attn_flops_per_token)
def build_attn(args: FusionModelArgs) -> SoftmaxAttention:
    return SoftmaxAttention(args)


@register_mixer("swa", family="attention", flops_per_token=swa_flops_per_token)
def build_swa(args: FusionModelArgs) -> SoftmaxAttention:
    if args.attn_window <= 0:
        raise ValueError(f"the swa mixer needs [model] attn_window > 0 (its window in tokens), got "
                         f"{args.attn_window}; e.g. --model.attn_window 1024")
    return SoftmaxAttention(args, window=args.attn_window)

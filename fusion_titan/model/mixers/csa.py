"""Compressed sparse attention (`csa`), after DeepSeek-V4 as the 95.7M seed describes it.

Two attention paths over the same per-head queries, blended per token and head:

  window path      exact causal attention over the last `csa_window` tokens (itself included)
  compressed path  attention over one learned summary per `csa_stride` consecutive tokens, for
                   the long-range context; the summary of block j (tokens j*s .. j*s + s - 1) is
                   readable only by queries at t >= (j + 1) * s - 1, its LAST token
                   (ops/compressed_attention.py)
  out_h = g_h * window_h + (1 - g_h) * compressed_h,   g = sigmoid(W_gate x)  [B, T, n_heads]

Design choices (docs/model.md, "csa"):
- Heads as in `attn`, with its pieces (mixers/attn.py): `QKVProjection` (n_heads query heads of
  head_dim, n_kv_heads K/V heads (GQA), optional per-head RMSNorm on q and k before RoPE) and
  `PartialRope` (the first rope_fraction of each head's dims, theta attn_rope_theta, a table of
  max_seq_len positions owned by the mixer and recomputed by init_weights). `attn_gate` is not
  used: the blend gate is csa's gate.
- Compressor: NSA-style (Native Sparse Attention, Yuan et al. 2025, its phi) learned linear map
  of the block's s raw (pre-norm, pre-RoPE) keys concatenated, [s * head_dim] -> head_dim,
  shared by the KV heads; one for keys, one for values. Initialised to the block mean, so a new
  model starts from mean pooling. With qk_norm the compressed key goes through the same k norm as
  the window keys (both paths' keys on one scale).
- RoPE on compressed keys at the position of the block's last token: the query-to-summary
  relative distance t - ((j+1)s - 1) is >= 0 exactly when the block is visible.
- The two paths have separate softmaxes (as NSA's branches); a query with no complete block yet
  gets a zero compressed output.
- Packed documents: window attention is masked per document; a summary is visible only inside
  its own document, and a block straddling a boundary is visible to nobody. Blocks are aligned to
  absolute positions (multiples of s), so a document starting mid-block never gets a summary of
  its first few tokens (they stay readable through the window).

Decoding cache (`CSACache`): the window's last csa_window rotated keys / values, every compressed
key / value so far, and the raw keys / values of the incomplete block (fewer than s tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...ops.attention import causal_attention
from ...ops.compressed_attention import (
    block_document_ids, compressed_attention, compressed_visibility,
)
from ..args import FusionModelArgs
from ..flops import average_keys_per_query
from ..param_init import assign_
from .attn import PartialRope, QKVProjection, attention_heads, softmax_attention_flops
from .registry import register_mixer


@dataclass
class CSACache:
    """Decoding state of one csa layer ([B, n_kv_heads, S, head_dim] tensors, S per field).

    window_k / window_v  the last csa_window tokens' keys (normed, rotated) and values
    block_k / block_v    every complete block's compressed key (normed, rotated) and value
    partial_k / partial_v  raw keys / values of the incomplete block: length % stride tokens
    length               tokens seen so far = absolute position of the next token
    """

    window_k: torch.Tensor
    window_v: torch.Tensor
    block_k: torch.Tensor
    block_v: torch.Tensor
    partial_k: torch.Tensor
    partial_v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, head_dim: int, dtype, device) -> "CSACache":
        def e():
            return torch.empty(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        return cls(e(), e(), e(), e(), e(), e())

    @property
    def n_blocks(self) -> int:
        return self.block_k.shape[2]


class CompressedSparseAttention(nn.Module):
    def __init__(self, args: FusionModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention_heads(args)
        self.stride = args.csa_stride
        self.window = args.csa_window
        self.backend = args.attn_backend
        if self.stride < 1 or self.window < 1:
            raise ValueError(f"csa needs csa_stride >= 1 and csa_window >= 1, got "
                             f"{self.stride} and {self.window}; set them in [model]")
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)

        self.qkv = QKVProjection(args.dim, self.n_heads, self.n_kv_heads, self.head_dim,
                                 args.qk_norm, args.norm_eps)
        self.rope = PartialRope(self.head_dim, args.rope_fraction, args.attn_rope_theta, args.max_seq_len)
        # block of `stride` raw keys / values (concatenated) -> one compressed key / value
        self.k_compressor = nn.Linear(self.stride * self.head_dim, self.head_dim, bias=False)
        self.v_compressor = nn.Linear(self.stride * self.head_dim, self.head_dim, bias=False)
        self.blend_gate = nn.Linear(args.dim, self.n_heads, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    # ------------------------------------------------------------------------------------------
    # compressor

    def compress(self, k_raw: torch.Tensor, v_raw: torch.Tensor, first_block: int):
        """Raw keys / values [B, n*s, H_kv, D] of n complete blocks -> compressed keys (normed,
        rotated at each block's last position) and values [B, n, H_kv, D]."""
        bsz, length, heads, dim = k_raw.shape
        n = length // self.stride

        def blocks(x):  # [B, n*s, H, D] -> [B, n, H, s*D]
            x = x.reshape(bsz, n, self.stride, heads, dim).transpose(2, 3)
            return x.reshape(bsz, n, heads, self.stride * dim)

        k_c = self.qkv.norm_k(self.k_compressor(blocks(k_raw)))
        v_c = self.v_compressor(blocks(v_raw))
        last = (torch.arange(first_block, first_block + n, device=k_raw.device) + 1) * self.stride - 1
        return self.rope(k_c, positions=last), v_c

    # ------------------------------------------------------------------------------------------
    # forward

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, cache: CSACache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; `rope` (the model's MLA table) is not used. With a cache,
        x continues the cached sequence and the cache is updated in place."""
        bsz, seqlen, _ = x.shape
        H, D = self.n_heads, self.head_dim
        if cache is not None and document_ids is not None:
            raise NotImplementedError("csa: document_ids cannot be combined with a decoding cache")
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + seqlen, device=x.device)

        q, k_raw, v_raw = self.qkv.project(x)  # the compressor reads the raw (pre-norm) keys
        q = self.rope(self.qkv.norm_q(q), start)
        k = self.rope(self.qkv.norm_k(k_raw), start)

        if cache is None:
            n_blocks = seqlen // self.stride
            block_k, block_v = self.compress(k_raw[:, : n_blocks * self.stride],
                                             v_raw[:, : n_blocks * self.stride], 0)
            window_k, window_v = k, v_raw
            block_docs = None if document_ids is None else block_document_ids(document_ids, self.stride)
        else:
            window_k, window_v, block_k, block_v = self._append(cache, k, v_raw, k_raw)
            block_docs = None

        q = q.transpose(1, 2)  # [B, H, T, D]
        # decoding: the key length changes every step, so a dense SDPA mask rather than a
        # FlexAttention BlockMask (and a recompile) per step, as attn does
        backend = "sdpa" if cache is not None and self.backend == "auto" else self.backend
        local = causal_attention(
            q, window_k.transpose(1, 2), window_v.transpose(1, 2), scale=self.softmax_scale,
            window=self.window, backend=backend, document_ids=document_ids,
        )
        visible = compressed_visibility(positions, block_k.shape[1], self.stride, document_ids, block_docs)
        distant = compressed_attention(q, block_k.transpose(1, 2), block_v.transpose(1, 2),
                                       visible, self.softmax_scale)
        gate = torch.sigmoid(self.blend_gate(x)).transpose(1, 2)[..., None]  # [B, H, T, 1]
        out = gate * local + (1 - gate) * distant
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, H * D))

    def _append(self, cache: CSACache, k, v, k_raw):
        """Add a chunk ([B, T, H_kv, D]) to the cache; return the window keys / values the chunk
        attends over (kept + new) and all compressed keys / values (old + completed now)."""
        window_k = torch.cat([cache.window_k, k.transpose(1, 2).to(cache.window_k.dtype)], dim=2)
        window_v = torch.cat([cache.window_v, v.transpose(1, 2).to(cache.window_v.dtype)], dim=2)
        pending_k = torch.cat([cache.partial_k, k_raw.transpose(1, 2).to(cache.partial_k.dtype)], dim=2)
        pending_v = torch.cat([cache.partial_v, v.transpose(1, 2).to(cache.partial_v.dtype)], dim=2)
        complete = pending_k.shape[2] // self.stride * self.stride
        new_k, new_v = self.compress(pending_k[:, :, :complete].transpose(1, 2),
                                     pending_v[:, :, :complete].transpose(1, 2), cache.n_blocks)
        block_k = torch.cat([cache.block_k, new_k.transpose(1, 2).to(cache.block_k.dtype)], dim=2)
        block_v = torch.cat([cache.block_v, new_v.transpose(1, 2).to(cache.block_v.dtype)], dim=2)

        cache.length += k.shape[1]
        # clone: a view would keep a long prefill's whole K/V alive
        cache.window_k = window_k[:, :, -self.window:].clone()
        cache.window_v = window_v[:, :, -self.window:].clone()
        cache.block_k, cache.block_v = block_k, block_v
        cache.partial_k, cache.partial_v = pending_k[:, :, complete:], pending_v[:, :, complete:]
        return window_k.transpose(1, 2), window_v.transpose(1, 2), block_k.transpose(1, 2), block_v.transpose(1, 2)

    # ------------------------------------------------------------------------------------------
    # cache and init

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None, device=None) -> CSACache:
        w = self.qkv.wk.weight
        return CSACache.empty(batch_size, self.n_kv_heads, self.head_dim,
                              dtype or w.dtype, device or w.device)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.qkv.init_weights(std)
        nn.init.trunc_normal_(self.blend_gate.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        # mean pooling over the block: weight [D, s*D] = [I/s, ..., I/s]
        mean = torch.eye(self.head_dim).repeat(1, self.stride) / self.stride
        for compressor in (self.k_compressor, self.v_compressor):
            assign_(compressor.weight, mean)  # FSDP may have sharded it already
        self.rope.reset_table()


def average_compressed_keys_per_query(seq_len: int, stride: int) -> float:
    """Mean over t = 0 .. L-1 of floor((t + 1) / stride): the complete blocks a query sees."""
    n = seq_len // stride
    return (stride * n * (n - 1) / 2 + n * (seq_len - n * stride + 1)) / seq_len


def csa_flops_per_token(args, seq_len: int) -> float:
    """Softmax attention's count (scores and weighted values) per key a query sees: the window
    keys (causal average) plus the complete blocks (t / stride on average). The
    compressor and gate are matmuls with parameters, counted by flops.py as 6 x params (it
    counts the compressors as if applied per token: s * D^2 per token instead of n_kv_heads *
    D^2, a small over-count at s = 4, n_kv_heads = 3)."""
    keys = (average_keys_per_query(seq_len, args.csa_window)
            + average_compressed_keys_per_query(seq_len, args.csa_stride))
    return softmax_attention_flops(args, keys)


@register_mixer("csa", family="attention", flops_per_token=csa_flops_per_token)
def build_csa(args: FusionModelArgs) -> CompressedSparseAttention:
    return CompressedSparseAttention(args)

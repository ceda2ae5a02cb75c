"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1).

Queries go through a low-rank bottleneck: c_q = RMSNorm(W_DQ x) with q_lora_rank dims, then
q = W_UQ c_q (q_lora_rank = 0 means a plain q = W_Q x). Keys and values share ONE compressed
latent c_kv = RMSNorm(W_DKV x) of kv_lora_rank dims, which is all a decoder has to cache besides
the rope key; W_UK / W_UV (together `wkv_b`) decompress it into per-head keys and values.

RoPE is decoupled (RoPE does not commute with W_UK, so it cannot live in the latent): each query
head gets an extra qk_rope_head_dim slice q_rope = RoPE(W_QR c_q), and there is ONE rope key
k_rope = RoPE(W_KR x) per token shared by all heads. The head's key is [k_nope; k_rope] and the
softmax scale is 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim).

n_kv_groups (constructor kwarg, default n_heads; or args.mla_kv_groups when set): how many
distinct decompressed (nope-key, value) pairs W_UK / W_UV produce. n_kv_groups = n_heads is
DeepSeek's MLA (every head decompresses its own K/V from the latent). n_kv_groups = G < n_heads
is GQA on top of MLA: wkv_b outputs G * (nope + v) features, and the n_heads / G consecutive
query heads of a group (head h is in group h // (n_heads / G)) share that group's nope-key and
value. The cache is unchanged (it holds the latent, not K/V); what shrinks is wkv_b, the
decompressed K/V activations in training, and the absorbed decode's per-group weights. G = 1 is
MQA over the latent.

Sliding window: `sliding_window` = W > 0 lets a query see itself and the W - 1 previous tokens;
0 is full causal attention.

Decoding: `forward(x, rope, cache=MLACache, ...)` appends this chunk's latent and rope key to the
cache and attends over cache + chunk. By default it uses the "absorbed" form (DeepSeek-V2
appendix C): W_UK is folded into the query (q_nope^T W_UK c_kv = (W_UK^T q_nope)^T c_kv) and W_UV
into the output, so attention runs directly over the cached latent, and K/V are never
decompressed. `absorb=False` decompresses the cache instead (the naive form, used by the tests
as a cross-check). With a sliding window the cache keeps only the last W tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...ops.attention import attention_mask, causal_attention
from ..args import FusionModelArgs
from ..flops import average_keys_per_query
from ..rope import apply_rope
from .registry import register_mixer


@dataclass
class MLACache:
    """Per-layer decoding cache of MLA: the compressed latent and the (already rotated) rope key.

    c_kv   [B, S, kv_lora_rank]  RMS-normalized latent of the S kept tokens
    k_rope [B, S, qk_rope_head_dim]  rope key of those tokens, rotation already applied
    length tokens seen so far = absolute position of the next token. With a sliding window only
           the last `window` tokens are kept (keep-last-window), so S = min(length, window).

    Appending concatenates (O(S) copy per step): a reference decoder, not a paged serving cache.
    """

    c_kv: torch.Tensor
    k_rope: torch.Tensor
    length: int = 0

    @classmethod
    def empty(
        cls, batch: int, kv_lora_rank: int, rope_dim: int,
        dtype: torch.dtype = torch.float32, device=None,
    ) -> "MLACache":
        return cls(
            torch.empty(batch, 0, kv_lora_rank, dtype=dtype, device=device),
            torch.empty(batch, 0, rope_dim, dtype=dtype, device=device),
        )

    @property
    def start(self) -> int:
        """Absolute position of the oldest kept token."""
        return self.length - self.c_kv.shape[1]

    def append(
        self, c_kv: torch.Tensor, k_rope: torch.Tensor, keep_last: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a chunk; return (latents, rope keys) of kept + new tokens to attend over, then trim
        the stored ones to the last `keep_last` tokens (0 = keep all)."""
        all_c = torch.cat([self.c_kv, c_kv.to(self.c_kv.dtype)], dim=1)
        all_r = torch.cat([self.k_rope, k_rope.to(self.k_rope.dtype)], dim=1)
        self.length += c_kv.shape[1]
        if keep_last > 0 and all_c.shape[1] > keep_last:
            self.c_kv, self.k_rope = all_c[:, -keep_last:].clone(), all_r[:, -keep_last:].clone()
        else:
            self.c_kv, self.k_rope = all_c, all_r
        return all_c, all_r

    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_rope.nbytes


@dataclass(frozen=True)
class CacheFootprint:
    """Bytes per token per layer of decoding caches (see `cache_bytes_per_token`)."""

    mla: int  # (kv_lora_rank + qk_rope_head_dim) * bytes: what MLACache stores
    mha: int  # 2 * n_heads * qk_nope_head_dim * bytes: MHA of the same heads (DeepSeek-V2 Table 1)
    decompressed: int  # n_heads * (qk_head_dim + v_head_dim) * bytes: caching this layer's own K/V

    @property
    def ratio(self) -> float:
        """How many times smaller the MLA cache is than the MHA one."""
        return self.mha / self.mla


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: FusionModelArgs, n_kv_groups: int | None = None, absorb: bool = True):
        super().__init__()
        self.dim = args.dim
        self.n_heads = args.n_heads
        self.n_kv_groups = n_kv_groups or getattr(args, "mla_kv_groups", 0) or args.n_heads
        if self.n_heads % self.n_kv_groups:
            raise ValueError(
                f"n_kv_groups ({self.n_kv_groups}) must divide n_heads ({self.n_heads})"
            )
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.window = args.sliding_window
        self.backend = args.attn_backend
        self.absorb = absorb  # decode form used when a cache is passed
        # The softmax temperature covers both the nope and the rope part of each head.
        self.softmax_scale = 1.0 / math.sqrt(self.qk_head_dim)

        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, self.n_kv_groups * (self.nope_dim + self.v_head_dim), bias=False
        )
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, args.dim, bias=False)

    # ------------------------------------------------------------------------------------------
    # projections

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Un-rotated queries [B, T, H, nope + rope]."""
        bsz, seqlen, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank > 0 else self.wq(x)
        return q.view(bsz, seqlen, -1, self.qk_head_dim)

    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token cache entry: normalized latent c_kv [B,T,kv_lora] and raw rope key [B,T,rope]."""
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_kv), k_rope

    def _rotated_queries(self, x, rope, start_pos: int):
        q_nope, q_rope = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, rope, start_pos=start_pos)

    def _rotated_latents(self, x, rope, start_pos: int):
        c_kv, k_rope = self.compress(x)
        # one rope key per token, shared by all heads
        return c_kv, apply_rope(k_rope.unsqueeze(2), rope, start_pos=start_pos).squeeze(2)

    def decompress(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent [B,S,kv_lora] -> per-group nope keys [B,S,G,nope] and values [B,S,G,v]."""
        bsz, seqlen, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(bsz, seqlen, -1, self.nope_dim + self.v_head_dim)
        return kv.split([self.nope_dim, self.v_head_dim], dim=-1)

    def _attend_decompressed(self, q_nope, q_rope, c_kv, k_rope, document_ids=None):
        """Naive form: decompress K/V (per group) and run the configured attention backend."""
        k_nope, v = self.decompress(c_kv)
        groups = k_nope.shape[2]
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, groups, -1)], dim=-1)
        out = causal_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            scale=self.softmax_scale, window=self.window, backend=self.backend,
            document_ids=document_ids,
        )
        bsz, seqlen = q.shape[:2]
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    # ------------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        cache: MLACache | None = None,
        start_pos: int | None = None,
        document_ids: torch.Tensor | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim].

        Without a cache: training / prefill-from-scratch path (decompressed K/V, any backend),
        positions start_pos (default 0) .. start_pos+T-1, optional document_ids [B, T] for
        intra-document masking. With a cache: x is the next chunk (positions cache.length ..), it
        is appended to the cache and attends over everything kept; absorbed form unless
        absorb=False (or the module's `absorb` is False).
        """
        if cache is None:
            pos = start_pos or 0
            q_nope, q_rope = self._rotated_queries(x, rope, pos)
            c_kv, k_rope = self._rotated_latents(x, rope, pos)
            return self._attend_decompressed(q_nope, q_rope, c_kv, k_rope, document_ids)

        if document_ids is not None:
            raise NotImplementedError("document masks are not supported with a decoding cache")
        pos = cache.length if start_pos is None else start_pos
        if pos != cache.length:
            raise ValueError(f"start_pos {pos} does not continue the cache (length {cache.length})")
        absorb = self.absorb if absorb is None else absorb
        q_nope, q_rope = self._rotated_queries(x, rope, pos)
        c_new, r_new = self._rotated_latents(x, rope, pos)
        c_kv, k_rope = cache.append(c_new, r_new, keep_last=max(self.window, 0))
        if absorb:
            return self.forward_absorbed(q_nope, q_rope, c_kv, k_rope)
        return self._attend_decompressed(q_nope, q_rope, c_kv, k_rope)

    def forward_absorbed(self, q_nope, q_rope, c_kv, k_rope) -> torch.Tensor:
        """Attention directly over the latent (DeepSeek-V2 appendix C "absorbed" form).

        q_nope [B,T,H,nope], q_rope [B,T,H,rope] (rotated), c_kv [B,S,kv_lora], k_rope [B,S,rope]
        (rotated); the T queries are the last T of the S positions. Returns [B, T, dim].
        score(h, s) = (W_UK[g]^T q_nope_h) . c_kv_s + q_rope_h . k_rope_s
        out_h       = W_UV[g] (sum_s p(h, s) c_kv_s)
        """
        bsz, seqlen, n_heads, _ = q_nope.shape
        groups = self.n_kv_groups
        compute = torch.promote_types(q_nope.dtype, torch.float32)
        w = self.wkv_b.weight.view(groups, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim].to(compute), w[:, self.nope_dim:].to(compute)

        q_nope = q_nope.to(compute).view(bsz, seqlen, groups, n_heads // groups, self.nope_dim)
        q_latent = torch.einsum("btgjn,gnr->btgjr", q_nope, w_uk).reshape(bsz, seqlen, n_heads, -1)
        c_kv, k_rope = c_kv.to(compute), k_rope.to(compute)
        scores = (
            torch.einsum("bthr,bsr->bhts", q_latent, c_kv)
            + torch.einsum("bthd,bsd->bhts", q_rope.to(compute), k_rope)
        ) * self.softmax_scale
        mask = attention_mask(seqlen, c_kv.shape[1], self.window, c_kv.device)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        o_latent = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        o_latent = o_latent.view(bsz, seqlen, groups, n_heads // groups, self.kv_lora_rank)
        out = torch.einsum("btgjr,gvr->btgjv", o_latent, w_uv).reshape(bsz, seqlen, -1)
        return self.wo(out.to(self.wo.weight.dtype))

    # ------------------------------------------------------------------------------------------
    # decoding helpers

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> MLACache:
        w = self.wkv_a.weight
        return MLACache.empty(
            batch, self.kv_lora_rank, self.rope_dim, dtype=dtype or w.dtype, device=device or w.device
        )

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> CacheFootprint:
        """Bytes per token per layer: MLA latent cache vs an MHA cache of the same heads.

        mha follows DeepSeek-V2's Table 1 (2 * n_heads * d_h with d_h = qk_nope_head_dim);
        decompressed is what caching this layer's decompressed keys (nope + rope) and values would
        take. `dtype` defaults to the parameters' dtype.
        """
        nbytes = (dtype or self.wkv_a.weight.dtype).itemsize
        return CacheFootprint(
            mla=(self.kv_lora_rank + self.rope_dim) * nbytes,
            mha=2 * self.n_heads * self.nope_dim * nbytes,
            decompressed=self.n_heads * (self.qk_head_dim + self.v_head_dim) * nbytes,
        )

    # ------------------------------------------------------------------------------------------
    # init

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


def mla_flops_per_token(args, seq_len: int) -> float:
    """Causal scores and weighted values: 2 * H * (d_qk + d_v) per key a query sees (the average
    honours the sliding window and counts the causal half only); x3 for forward + backward."""
    keys = average_keys_per_query(seq_len, args.sliding_window)
    return 3 * 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * keys


@register_mixer("mla", family="attention", flops_per_token=mla_flops_per_token)
def build_mla(args: FusionModelArgs) -> MultiHeadLatentAttention:
    return MultiHeadLatentAttention(args)

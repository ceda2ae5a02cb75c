"""Engram: hashed n-gram memory added to the residual stream (`[model] engram_layers`).

Following DeepSeek's Engram ("Conditional Memory via Scalable Lookup: A New Axis of Sparsity for
Large Language Models", 2026, and its reference code `engram_demo_v1.py`):

- at position t, for every order n = 2..N (`engram_ngram`) and every hash head j (`engram_heads`),
  the n-gram (x_t, x_{t-1}, ..., x_{t-n+1}) is hashed by a multiplicative-XOR hash,
  XOR_k (x_{t-k} * m_{n,j,k}) mod p_{n,j}, with fixed odd multipliers m drawn from a seed per
  layer and head, and a distinct prime p >= `engram_table_size` per head; positions before the
  sequence start (or, with document masking, in an earlier document) read PAD_ID;
- each head looks up its own slice of one nn.Embedding table (rows = the sum of the primes,
  width `engram_dim / engram_heads`); the heads' vectors are concatenated, e_t of width
  (N - 1) * engram_dim;
- context-aware gate: k_t = W_k e_t, v_t = W_v e_t,
  alpha_t = sigmoid(<RMSNorm(h_t), RMSNorm(k_t)> / sqrt(dim)), and h_t += alpha_t * v_t.
  With hyper-connection streams [B, T, n, D] each stream gets its own gate (its own query h),
  the value is shared.

Left out of the reference design: the tokenizer compression (normalised-text id merging), the
signed square root the demo code applies to the gate logit before the sigmoid, and the short
causal depthwise convolution after the gate (so decoding needs only the last N - 1 token ids).
The lookup only reads tokens at or before t, so the module is causal.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn as nn

PAD_ID = -1  # never a real token id: "before the sequence / document start"
HASH_SEED = 10007  # + layer index: each Engram layer hashes with its own multipliers


def is_engram_table(name: str) -> bool:
    """Whether a parameter name (as model.named_parameters gives it) is an Engram table."""
    return name.startswith("engrams.") and name.endswith(".table.weight")


def _is_prime(k: int) -> bool:
    if k < 2:
        return False
    if k % 2 == 0:
        return k == 2
    return all(k % d for d in range(3, math.isqrt(k) + 1, 2))


def distinct_primes(start: int, count: int) -> list[int]:
    """The `count` smallest primes >= start (distinct moduli make the heads' collisions differ)."""
    primes, k = [], start
    while len(primes) < count:
        if _is_prime(k):
            primes.append(k)
        k += 1
    return primes


class NgramHasher:
    """Deterministic hash of the 2..N-grams ending at each position into per-head table rows."""

    def __init__(self, args, layer: int):
        self.ngram, self.heads = args.engram_ngram, args.engram_heads
        orders = self.ngram - 1
        rng = random.Random(HASH_SEED + layer)
        # products of an id (< vocab, or PAD_ID) and a multiplier stay inside int64
        bound = (1 << 62) // max(args.vocab_size, 2)
        self.multipliers = [[[2 * rng.randrange(bound // 2) + 1 for _ in range(self.ngram)]
                             for _ in range(self.heads)] for _ in range(orders)]
        self.moduli = distinct_primes(args.engram_table_size, orders * self.heads)
        self.offsets = [sum(self.moduli[:i]) for i in range(len(self.moduli))]
        self.rows = sum(self.moduli)

    def __call__(self, shifted: list[torch.Tensor]) -> torch.Tensor:
        """shifted[k] [B, T] = the id k positions back (k = 0..N-1) -> table rows
        [B, T, (N - 1) * heads], orders outer, heads inner."""
        rows = []
        for order in range(2, self.ngram + 1):
            for head in range(self.heads):
                i = (order - 2) * self.heads + head
                mults = self.multipliers[order - 2][head]
                mix = shifted[0] * mults[0]
                for k in range(1, order):
                    mix = torch.bitwise_xor(mix, shifted[k] * mults[k])
                rows.append(torch.remainder(mix, self.moduli[i]) + self.offsets[i])
        return torch.stack(rows, dim=-1)


class Engram(nn.Module):
    def __init__(self, args, layer: int):
        super().__init__()
        self.hasher = NgramHasher(args, layer)
        self.dim = args.dim
        head_dim = args.engram_dim // args.engram_heads
        memory_dim = (args.engram_ngram - 1) * args.engram_dim
        # a plain dense-gradient table (sparse=False): FSDP2 shards it along the rows like the
        # vocabulary embedding, and the optimizer updates it as one dense tensor
        self.table = nn.Embedding(self.hasher.rows, head_dim)
        self.key_proj = nn.Linear(memory_dim, args.dim, bias=False)
        self.value_proj = nn.Linear(memory_dim, args.dim, bias=False)
        self.key_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.query_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def shifted_ids(self, tokens: torch.Tensor, previous: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[ids k positions back, k = 0..N-1], each [B, T]. Before the chunk come `previous`
        [B, N - 1] (decoding: the last ids seen) or PAD_ID (the sequence start); with
        document_ids [B, T], an id from an earlier document than the reading position is PAD_ID."""
        back, length = self.hasher.ngram - 1, tokens.shape[1]
        missing = back - (0 if previous is None else previous.shape[1])
        pad = tokens.new_full((tokens.shape[0], missing), PAD_ID)
        context = torch.cat([pad, tokens] if previous is None else [pad, previous.to(tokens.dtype), tokens], dim=1)
        shifted = [context[:, back - k:back - k + length] for k in range(back + 1)]
        if document_ids is not None:
            docs = torch.cat([document_ids.new_full((tokens.shape[0], back), -1), document_ids], dim=1)
            shifted = [torch.where(docs[:, back - k:back - k + length] == document_ids, ids, PAD_ID)
                       for k, ids in enumerate(shifted)]
        return shifted

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, previous: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D] (or hyper-connection streams [B, T, n, D]) -> h + gate * value."""
        memory = self.table(self.hasher(self.shifted_ids(tokens, previous, document_ids))).flatten(-2)  # [B, T, M]
        key = self.key_norm(self.key_proj(memory))
        value = self.value_proj(memory)
        if h.dim() == 4:  # one gate per stream
            key, value = key.unsqueeze(-2), value.unsqueeze(-2)
        gate = torch.sigmoid((self.query_norm(h) * key).sum(-1, keepdim=True) / math.sqrt(self.dim))
        return h + gate * value.to(h.dtype)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.table.weight, std=std)
        nn.init.trunc_normal_(self.key_proj.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.value_proj.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        self.key_norm.reset_parameters()
        self.query_norm.reset_parameters()

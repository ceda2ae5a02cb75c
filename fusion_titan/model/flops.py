"""Parameter counts and training FLOPs per token for the hybrid, counted from the built model.

FLOPs convention (what MFU divides by): 6 x (parameters a token touches) for the matmuls, plus
the sequence-mixing work that has no parameters:
- causal MLA: 2 * H * (d_qk + d_v) * (average number of keys a query sees) forward, x3 for
  forward + backward; the average honours the sliding window and counts only the causal half;
- Gated DeltaNet (chunked form, chunk C): per head and token C*(3*d_k + 2*d_v) for the
  lower-triangular intra-chunk products (counted at half, like causal attention) plus 6*d_k*d_v for
  the state read/update; x3 for forward + backward;
- the tied output head (V x D) once for the trunk and once per MTP depth.
Only the top-k routed experts count as touched, the shared experts always do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

GDN_CHUNK = 64


@dataclass
class ParamCounts:
    total: int  # every parameter, the tied embedding/head once
    active: int  # parameters one token touches (top-k routed experts only)
    embedding: int
    routed_experts: int
    mtp: int  # training-only multi-token-prediction modules

    @property
    def trunk_total(self) -> int:
        return self.total - self.mtp

    @property
    def trunk_active(self) -> int:
        return self.active - self.mtp


def count_params(model: nn.Module, args) -> ParamCounts:
    total = embedding = routed = mtp = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith("tok_embeddings"):
            embedding += n
        if ".moe.experts." in name:
            routed += n
        if name.startswith("mtp."):
            mtp += n
    inactive = 0
    if args.n_routed_experts:
        inactive = routed - routed * args.n_activated_experts // args.n_routed_experts
    return ParamCounts(total=total, active=total - inactive, embedding=embedding,
                       routed_experts=routed, mtp=mtp)


def average_keys_per_query(seq_len: int, window: int) -> float:
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions t < window see t+1 keys, later ones see `window`
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_breakdown(args, seq_len: int, counts: ParamCounts) -> dict[str, float]:
    """Training FLOPs per token (forward + backward) by kind of work; they sum to flops_per_token."""
    head_uses = 1 + args.mtp_depth  # the tied head is a V x D matmul per use...
    kinds = args.block_kinds()
    n_attn = kinds.count("attn") + args.mtp_depth
    n_gdn = kinds.count("gdn")
    keys = average_keys_per_query(seq_len, args.sliding_window)
    if args.ssm_type == "mamba2":
        # SSD, chunk C: intra-chunk C*B^T and its product with x (causal half), plus the state
        # write and read (2 * p * n each); heads = 2 * dim / head_dim
        p, n = args.mamba_head_dim, args.mamba_d_state
        heads, per_head = 2 * args.dim // p, GDN_CHUNK * (n + p) + 4 * p * n
    else:
        dk, dv = args.gdn_head_k_dim, args.gdn_head_v_dim
        heads, per_head = args.gdn_n_heads, GDN_CHUNK * (3 * dk + 2 * dv) + 6 * dk * dv
    return {
        # ...while the embedding lookup is free
        "matmuls (active params, no embedding)": 6 * (counts.active - counts.embedding),
        "output head (trunk + MTP)": 6 * head_uses * args.vocab_size * args.dim,
        "attention (causal, windowed)": 3 * n_attn * 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * keys,
        "recurrent mixer (GDN / SSD)": 3 * n_gdn * heads * per_head,
    }


def flops_per_token(args, seq_len: int, counts: ParamCounts) -> int:
    return int(sum(flops_breakdown(args, seq_len, counts).values()))

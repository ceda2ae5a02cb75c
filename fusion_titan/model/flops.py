"""Parameter counts and training FLOPs per token for the hybrid, counted from the built model.

FLOPs convention (what MFU divides by): 6 x (parameters a token touches) for the matmuls, plus
the sequence-mixing work that has no parameters, which each mixer kind counts itself
(`flops_per_token` in its registry entry, fusion_titan/model/mixers: e.g. causal MLA
2 * H * (d_qk + d_v) per key a query sees, x3 for forward + backward);
- the tied output head (V x D) once for the trunk and once per MTP depth;
- hyper-connections (residual = "hyper"): the streams' mixing, which has no parameters
  (`hyper_mixing_flops_per_token`; their small coefficient projections are parameters).
Only the top-k routed experts count as touched, the shared experts always do. Like the
embedding, the Engram tables are lookups: their rows cost no matmul FLOPs (the Engram key and
value projections do, as parameters; the gate's dot product, 2 D per stream, is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .engram import is_engram_table

GDN_CHUNK = 64


@dataclass
class ParamCounts:
    total: int  # every parameter, the tied embedding/head once
    active: int  # parameters one token touches (top-k routed experts only)
    embedding: int
    routed_experts: int
    mtp: int  # training-only multi-token-prediction modules
    engram_tables: int = 0  # Engram n-gram tables (lookups, like the embedding)

    @property
    def trunk_total(self) -> int:
        return self.total - self.mtp

    @property
    def trunk_active(self) -> int:
        return self.active - self.mtp


def count_params(model: nn.Module, args) -> ParamCounts:
    total = embedding = routed = mtp = tables = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith("tok_embeddings"):
            embedding += n
        if ".moe.experts." in name:
            routed += n
        if name.startswith("mtp."):
            mtp += n
        if is_engram_table(name):
            tables += n
    inactive = 0
    if args.n_routed_experts:
        inactive = routed - routed * args.n_activated_experts // args.n_routed_experts
    return ParamCounts(total=total, active=total - inactive, embedding=embedding,
                       routed_experts=routed, mtp=mtp, engram_tables=tables)


def average_keys_per_query(seq_len: int, window: int) -> float:
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions t < window see t+1 keys, later ones see `window`
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_breakdown(args, seq_len: int, counts: ParamCounts) -> dict[str, float]:
    """Training FLOPs per token (forward + backward) by kind of work; they sum to flops_per_token."""
    from .hyper_connections import hyper_mixing_flops_per_token
    from .mixers import mixer_kind  # the mixers import this module's helpers

    head_uses = 1 + args.mtp_depth  # the tied head is a V x D matmul per use...
    out = {
        # ...while the embedding and Engram lookups are free
        "matmuls (active params, no embedding)": 6 * (counts.active - counts.embedding - counts.engram_tables),
        "output head (trunk + MTP)": 6 * head_uses * args.vocab_size * args.dim,
    }
    # the MTP modules' blocks are MLA blocks
    kinds = args.block_kinds() + ["mla"] * args.mtp_depth
    for kind in dict.fromkeys(kinds):
        out[f"sequence mixing: {kind}"] = kinds.count(kind) * mixer_kind(kind).flops_per_token(args, seq_len)
    if args.residual == "hyper":
        out["hyper-connection stream mixing"] = hyper_mixing_flops_per_token(args)
    return out


def flops_per_token(args, seq_len: int, counts: ParamCounts) -> int:
    return int(sum(flops_breakdown(args, seq_len, counts).values()))

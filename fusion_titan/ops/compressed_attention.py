"""Attention of queries over compressed (block-summary) keys, with the block causality rule.

Compressed entry j summarises the `stride` tokens j*stride .. (j+1)*stride - 1. A query at
absolute position t may read entry j only once the block is complete:

    (j + 1) * stride - 1 <= t

so a query never sees a summary that contains a token after it. With packed documents an entry is
visible only to queries of its own document, and a block that straddles a document boundary is
visible to nobody (its summary mixes two documents).

A query with no visible entry (t < stride - 1, or the first block of its document not yet
complete) gets a zero output. Layout: q [B, H, T, D], k / v [B, H_kv, N, D] (H_kv divides H;
query head h reads kv head h // (H / H_kv)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compressed_visibility(
    q_positions: torch.Tensor, n_blocks: int, stride: int,
    document_ids: torch.Tensor | None = None, block_document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [1 or B, 1, T, N]: True where the query at q_positions[i] may read entry j.

    document_ids [B, T] are the queries' documents; block_document_ids [B, N] each entry's
    document, or -1 for a block that straddles a boundary (never visible)."""
    block_last = (torch.arange(n_blocks, device=q_positions.device) + 1) * stride - 1
    visible = (block_last[None, :] <= q_positions[:, None])[None, None]
    if document_ids is not None:
        same = document_ids[:, :, None] == block_document_ids[:, None, :]
        visible = visible & (same & (block_document_ids[:, None, :] >= 0))[:, None]
    return visible


def block_document_ids(document_ids: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, T] token documents -> [B, T // stride] block documents, -1 where a block spans two."""
    n_blocks = document_ids.shape[1] // stride
    blocks = document_ids[:, : n_blocks * stride].view(-1, n_blocks, stride)
    whole = (blocks == blocks[..., :1]).all(-1)
    return torch.where(whole, blocks[..., 0], torch.full_like(blocks[..., 0], -1))


def compressed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
) -> torch.Tensor:
    """softmax over the visible compressed entries (SDPA with a boolean mask); zero output for a
    query that sees none. visible: from `compressed_visibility`."""
    n_heads = q.shape[1]
    if k.shape[2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    if k.shape[1] != n_heads:
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    any_visible = visible.any(-1, keepdim=True)
    # A row with nothing visible would be an all -inf softmax (NaN): let it read everything and
    # zero its output afterwards, which also zeroes the gradient it would send to k and v.
    safe = visible | ~any_visible
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    return out * any_visible.to(out.dtype)

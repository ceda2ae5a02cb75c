"""Causal attention with optional sliding window, behind one call whatever the backend.

Layout is [B, H, T, D]; q/k may have a larger head dim than v (MLA: 192 vs 128).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "reference")


def window_mask(q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True where query i may attend key j (queries are the last q_len keys)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= k_pos > q_pos - window
    return allowed


def reference_attention(q, k, v, scale: float, window: int = 0) -> torch.Tensor:
    """Plain softmax(QK^T)V in float32: the obviously-correct path every backend is tested against."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    mask = window_mask(q.shape[2], k.shape[2], window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).type_as(q)


def causal_attention(q, k, v, scale: float | None = None, window: int = 0, backend: str = "sdpa"):
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "reference":
        return reference_attention(q, k, v, scale, window)
    if backend != "sdpa":
        raise ValueError(f"attn_backend {backend!r} is not one of {BACKENDS}")
    if window <= 0 or window >= k.shape[2]:
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if q.shape[2] == 1:  # one decode step sees every cached key
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = window_mask(q.shape[2], k.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

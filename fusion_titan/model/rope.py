"""Rotary position embedding for MLA's decoupled rope dimensions (rotate-half convention)."""

from __future__ import annotations

import torch


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """[max_seq_len, head_dim] holding cos in the first half and sin in the second half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles of positions (default 0..T-1)."""
    seq_len, half = x.shape[1], x.shape[-1] // 2
    table = cache[:seq_len] if positions is None else cache[positions]
    cos, sin = table[..., :half], table[..., half:]
    if cos.dim() == 2:  # [T, half] -> broadcast over batch and heads
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, half]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)

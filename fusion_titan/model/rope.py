"""Rotary position embedding for MLA's decoupled rope dimensions (rotate-half convention)."""

from __future__ import annotations

import torch


def rope_cache(
    head_dim: int, max_seq_len: int, theta: float, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[max_seq_len, head_dim] holding cos in the first half and sin in the second half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=dtype), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope(
    x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor | None = None, start_pos: int = 0
) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles of its positions.

    Positions are start_pos .. start_pos+T-1 unless `positions` ([T] or [B, T]) is given. The math
    runs in float32, or float64 when x or the table is float64, and the result has x's dtype.
    """
    seq_len, half = x.shape[1], x.shape[-1] // 2
    if positions is None:
        if start_pos + seq_len > cache.shape[0]:
            raise ValueError(
                f"positions up to {start_pos + seq_len} exceed the rope table ({cache.shape[0]}); "
                "raise max_seq_len"
            )
        table = cache[start_pos:start_pos + seq_len]
    else:
        table = cache[positions]
    compute = torch.promote_types(torch.promote_types(x.dtype, cache.dtype), torch.float32)
    table = table.to(compute)
    cos, sin = table[..., :half], table[..., half:]
    if cos.dim() == 2:  # [T, half] -> broadcast over batch and heads
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, half]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xc = x.to(compute)
    x1, x2 = xc[..., :half], xc[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)

"""The accumulation dtype every op here shares."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision inputs; float64 stays float64 (the reference tests run there)."""
    return torch.promote_types(dtype, torch.float32)

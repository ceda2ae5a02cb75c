"""Quintic Newton-Schulz orthogonalization (the "zeroth power" used by Muon).

For a matrix G = U S V^T this returns approximately U S' V^T with S' close to
the identity. The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) are Keller
Jordan's: they maximise the slope of the iteration polynomial at zero, so small
singular values grow quickly, at the price of not converging exactly to 1. After
five steps the singular values land roughly in [0.7, 1.2], which works as well as
the exact polar factor for optimization.
"""

from __future__ import annotations

import torch

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def iteration_dtype(G: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype Newton-Schulz iterates in: ``dtype``, else bf16 on CUDA and fp32 elsewhere."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if G.is_cuda else torch.float32


def zeropower_via_newtonschulz5(
    G: torch.Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximately orthogonalize the last two dims of ``G`` ([..., m, n]).

    Leading dims are treated as a batch (e.g. MoE experts). ``dtype`` is the
    dtype the iterations run in: default bfloat16 on CUDA (fast and accurate
    enough for this iteration) and float32 elsewhere (CPU bf16 matmul is slow).
    The result has ``out_dtype`` (default: ``G``'s dtype; the iteration dtype skips a cast).
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    dtype = iteration_dtype(G, dtype)
    a, b, c = _NS_COEFFS

    X = G.float().reshape(-1, G.size(-2), G.size(-1))  # a batch of matrices
    # Iterate on the wide orientation so X @ X^T is the smaller Gram matrix.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # Scale so the spectral norm is <= 1 (Frobenius norm bounds it), which puts
    # every singular value inside the iteration's basin. Done in fp32 for accuracy.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    X = X.to(dtype)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2, fused into the matmul
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(out_dtype or G.dtype)

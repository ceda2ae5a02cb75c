"""An independent float64 Newton-Schulz reference, written from the published quintic iteration.

Keller Jordan's Muon (github.com/KellerJordan/Muon, zeropower_via_newtonschulz5): normalise by the
Frobenius norm (+ eps), iterate on the wide orientation (transpose tall matrices), and repeat
X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315).
Plain float64 matmuls, one matrix at a time: nothing is shared with fusion_titan.optim.
"""

import torch

A_COEFF, B_COEFF, C_COEFF = 3.4445, -4.7750, 2.0315


def reference_newton_schulz_2d(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    X = G.to(torch.float64)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (torch.linalg.matrix_norm(X, ord="fro") + eps)
    for _ in range(steps):
        A = X @ X.T
        X = A_COEFF * X + (B_COEFF * A + C_COEFF * (A @ A)) @ X
    return X.T if tall else X


def reference_newton_schulz(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Any leading dims are a batch of independent matrices; returns float64."""
    flat = G.reshape(-1, *G.shape[-2:])
    return torch.stack([reference_newton_schulz_2d(m, steps, eps) for m in flat]).reshape(G.shape)

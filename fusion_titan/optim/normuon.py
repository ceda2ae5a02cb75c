"""NorMuon: Muon with neuron-wise (per output row) second-moment normalization.

Li et al., 2025, "NorMuon: Making Muon more efficient and scalable"
(arXiv 2510.05491; reference code github.com/zichongli5/NorMuon).

Per matrix W (m x n, rows = output neurons) and step t:

    M   = beta1 * M + (1 - beta1) * G              momentum buffer
    U   = Nesterov ? (1 - beta1) * G + beta1 * M : M
    O   = NS5(U)                                   Newton-Schulz orthogonalization
    v   = beta2 * v + (1 - beta2) * mean_cols(O^2)  one value per row, shape [m, 1]
    O^  = O / (sqrt(v) + eps)
    W   = W - lr * wd * W - lr * s * O^

with the scale ``s`` chosen by ``update_scale``:

* ``"adamw"`` (default, Algorithm 1 of the paper): s = 0.2 * sqrt(m n) / ||O^||_F,
  so the update RMS is exactly 0.2 * lr, i.e. matches a typical AdamW update and
  AdamW-style learning rates (~1e-3) can be reused.
* ``"muon"`` (the reference repository's code): s = ||O||_F / ||O^||_F *
  sqrt(max(1, m / n)), i.e. keep the Frobenius norm of the plain Muon update and
  apply Keller Jordan's shape factor; use Muon learning rates (~0.02) with it.

Tensors with more than two dims (MoE experts, [n_experts, out, in]) are a batch
of matrices: each expert is orthogonalized, normalized and scaled on its own.

Momentum, Newton-Schulz and the owner-sharded FSDP2 / expert-parallel machinery are shared with
Muon (orthogonalized_momentum.py); the second moment ([..., m, 1], one value per row) is the
per-row state that travels with each matrix's rows and is sharded like its parameter.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .orthogonalized_momentum import OrthogonalizedMomentum


class NorMuon(OrthogonalizedMomentum):
    """NorMuon for matrix (2-D) and batched-matrix (3-D, MoE expert) parameters.

    Args:
        params: parameters or param groups; every parameter needs ndim >= 2.
        lr: learning rate (AdamW scale with ``update_scale="adamw"``).
        momentum: beta1 of the momentum buffer.
        beta2: decay of the per-row second moment.
        eps: added to sqrt(second moment) before dividing.
        weight_decay: decoupled weight decay, W -= lr * weight_decay * W.
        nesterov: use the Nesterov-style blend of gradient and momentum.
        ns_steps: Newton-Schulz iterations.
        update_scale: ``"adamw"`` (paper) or ``"muon"`` (reference code), see module doc.
        ns_dtype: dtype of the Newton-Schulz iterations; None = bf16 on CUDA, fp32 otherwise.
        bucket_mb: MiB of whole fp32 matrices one rank owns per exchange round (sharded params).

    Groups may override lr, momentum, beta2, eps, weight_decay, nesterov,
    ns_steps and update_scale.
    """

    ROW_STATE = "second_moment"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        update_scale: str = "adamw",
        ns_dtype: torch.dtype | None = None,
        bucket_mb: float = 512.0,
    ):
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            nesterov=nesterov,
            ns_steps=ns_steps,
            update_scale=update_scale,
        )
        super().__init__(params, defaults, ns_dtype=ns_dtype, bucket_mb=bucket_mb)

    @staticmethod
    def _row_factors(O: torch.Tensor, v: torch.Tensor, group: dict
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row factors f with direction = f * O, and the new second moment.

        NorMuon's O_hat = O / (sqrt(v) + eps) and the per-matrix rescale both act per row, so
        they fold into one factor per row; the norms they need come from the rows' sums of
        squares, so O is read once here and once when applied (no O_hat tensor).
        """
        m, n = O.shape[-2], O.shape[-1]
        acc = torch.promote_types(O.dtype, torch.float32)  # bf16 O: accumulate in fp32
        row_sq = torch.linalg.vector_norm(O, dim=-1, keepdim=True, dtype=acc).float().square()
        # Per-row (per output neuron) EMA of the mean squared update.
        v = v.lerp(row_sq / n, 1.0 - group["beta2"])
        inv = 1.0 / (v.sqrt() + group["eps"])
        # Per matrix (per expert for 3-D) rescale of the whole update: ||O_hat||_F from rows.
        hat_norm = (row_sq * inv.square()).sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
        if group["update_scale"] == "adamw":
            scale = 0.2 * math.sqrt(m * n) / hat_norm
        else:
            o_norm = row_sq.sum(dim=(-2, -1), keepdim=True).sqrt()
            scale = o_norm / hat_norm * math.sqrt(max(1.0, m / n))
        return inv * scale, v

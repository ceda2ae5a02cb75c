"""Muon: Newton-Schulz orthogonalized Nesterov momentum for matrices.

Keller Jordan, 2024, "Muon: An optimizer for hidden layers in neural networks"
(kellerjordan.github.io/posts/muon; reference code github.com/KellerJordan/Muon).

Per matrix W (m x n, rows = output neurons) and step t:

    M = beta1 * M + (1 - beta1) * G              momentum buffer
    U = Nesterov ? (1 - beta1) * G + beta1 * M : M
    O = NS5(U)                                   Newton-Schulz orthogonalization
    W = W - lr * wd * W - lr * s * O

with the scale ``s`` chosen by ``update_scale``:

* ``"muon"`` (default, the reference code): s = sqrt(max(1, m / n)), Keller Jordan's shape
  factor; Muon learning rates (~0.02).
* ``"adamw"``: s = 0.2 * sqrt(m n) / ||O||_F, so the update RMS is exactly 0.2 * lr, like a
  typical AdamW update (Moonlight's rescaling, with the exact norm); AdamW-sized lr (~1e-3).

This is NorMuon without its per-neuron second moment: momentum, Newton-Schulz, 3-D expert stacks
and the owner-sharded FSDP2 / expert-parallel machinery are shared (orthogonalized_momentum.py).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .orthogonalized_momentum import OrthogonalizedMomentum


class Muon(OrthogonalizedMomentum):
    """Muon for matrix (2-D) and batched-matrix (3-D, MoE expert) parameters.

    Args:
        params: parameters or param groups; every parameter needs ndim >= 2.
        lr: learning rate (Muon scale with ``update_scale="muon"``).
        momentum: beta1 of the momentum buffer.
        weight_decay: decoupled weight decay, W -= lr * weight_decay * W.
        nesterov: use the Nesterov-style blend of gradient and momentum.
        ns_steps: Newton-Schulz iterations.
        update_scale: ``"muon"`` (reference code) or ``"adamw"`` (update RMS 0.2), see module doc.
        ns_dtype: dtype of the Newton-Schulz iterations; None = bf16 on CUDA, fp32 otherwise.
        bucket_mb: MiB of whole fp32 matrices one rank owns per exchange round (sharded params).

    Groups may override lr, momentum, weight_decay, nesterov, ns_steps and update_scale.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        update_scale: str = "muon",
        ns_dtype: torch.dtype | None = None,
        bucket_mb: float = 512.0,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, update_scale=update_scale)
        super().__init__(params, defaults, ns_dtype=ns_dtype, bucket_mb=bucket_mb)

    @staticmethod
    def _row_factors(O: torch.Tensor, row_state: None, group: dict) -> tuple[torch.Tensor, None]:
        """One factor per matrix ([b, 1, 1]): the update is s * O."""
        m, n = O.shape[-2], O.shape[-1]
        if group["update_scale"] == "muon":
            scale = torch.full((O.shape[0], 1, 1), math.sqrt(max(1.0, m / n)),
                               dtype=torch.float32, device=O.device)
        else:
            acc = torch.promote_types(O.dtype, torch.float32)  # bf16 O: accumulate in fp32
            norm = torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True, dtype=acc).float()
            scale = 0.2 * math.sqrt(m * n) / norm.clamp_min(1e-12)
        return scale, None

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

FSDP2 / DTensor: orthogonalization needs the whole matrix, so each step gathers
the full momentum-blended update (``full_tensor()``, one all-gather per
parameter), runs the same deterministic computation on every rank, and applies
only the rows/experts that the rank owns (sliced by the shard's global offset).
The momentum buffer is a DTensor sharded like the parameter. The second moment
is tiny ([..., m, 1]) and is needed in full for the Frobenius rescale, so it is
stored as a *replicated* DTensor on the parameter's mesh: no extra
communication, and DCP can save and reshard it like any other DTensor.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .newton_schulz import zeropower_via_newtonschulz5

_UPDATE_SCALES = ("adamw", "muon")
# Largest stack of same-shape updates orthogonalized in one call (elements; 1 GiB in fp32).
NS_BATCH_ELEMENTS = 1 << 28


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (the tensor itself when not distributed)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Slice of ``full`` that corresponds to ``like``'s local shard."""
    if not isinstance(like, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(
        like.shape, like.device_mesh, like.placements
    )
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


class NorMuon(torch.optim.Optimizer):
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

    Groups may override lr, momentum, beta2, eps, weight_decay, nesterov,
    ns_steps and update_scale.
    """

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
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        if update_scale not in _UPDATE_SCALES:
            raise ValueError(f"update_scale must be one of {_UPDATE_SCALES}, got {update_scale!r}")
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
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"NorMuon only handles matrices (ndim >= 2); got shape {tuple(p.shape)}. "
                        "Give vectors/scalars to an element-wise optimizer."
                    )

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # Same type and sharding as p (a DTensor for FSDP2 params).
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            v_shape = (*p.shape[:-1], 1)
            if isinstance(p, DTensor):
                # Full-size, replicated on every rank (see module docstring).
                zeros = torch.zeros(v_shape, dtype=torch.float32, device=p.to_local().device)
                state["second_moment"] = DTensor.from_local(
                    zeros, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False
                )
            else:
                state["second_moment"] = torch.zeros(v_shape, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2, eps = group["momentum"], group["beta2"], group["eps"]
            pending = []  # (param, full momentum-blended update, second moment)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if isinstance(p, DTensor) and grad.placements != p.placements:
                    grad = grad.redistribute(p.device_mesh, p.placements)
                state = self._init_state(p)

                # Momentum is element-wise: do it on the local shard only.
                g_local = _local(grad)
                buf_local = _local(state["momentum_buffer"])
                buf_local.lerp_(g_local, 1.0 - beta1)
                u_local = g_local.lerp(buf_local, beta1) if group["nesterov"] else buf_local

                # Orthogonalization needs the whole matrix.
                if isinstance(p, DTensor):
                    u = DTensor.from_local(
                        u_local, p.device_mesh, p.placements,
                        run_check=False, shape=p.shape, stride=p.stride(),
                    ).full_tensor()
                else:
                    u = u_local
                pending.append((p, u, _local(state["second_moment"])))

            orthogonal = self._orthogonalize_batched([u for _, u, _ in pending], group["ns_steps"])
            for (p, u, v), O in zip(pending, orthogonal):
                update = self._normuon_direction(O, v, beta2, eps, group)
                p_local = _local(p)
                if wd != 0.0:
                    p_local.mul_(1.0 - lr * wd)
                p_local.add_(_local_part(update, p).to(p_local.dtype), alpha=-lr)

        return loss

    def _orthogonalize_batched(self, updates: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """Newton-Schulz of every update, same-shape matrices stacked into one batched call.

        Per-matrix results equal separate calls (the iteration is independent per matrix);
        batching turns hundreds of small matmul launches into a few large ones. Buckets are
        capped at NS_BATCH_ELEMENTS so the stacked copies stay a bounded amount of memory.
        """
        out: list[torch.Tensor | None] = [None] * len(updates)
        buckets: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            buckets.setdefault((u.shape[-2], u.shape[-1], u.device, u.dtype), []).append(i)
        for (m, n, _, _), members in buckets.items():
            batch: list[int] = []
            size = 0
            for j, i in enumerate(members):
                batch.append(i)
                size += updates[i].numel()
                if size >= NS_BATCH_ELEMENTS or j == len(members) - 1:
                    stacked = torch.cat([updates[k].reshape(-1, m, n) for k in batch])
                    O = zeropower_via_newtonschulz5(stacked, steps=steps, dtype=self.ns_dtype)
                    for k, part in zip(batch, O.split([updates[k].numel() // (m * n) for k in batch])):
                        out[k] = part.reshape(updates[k].shape)
                    batch, size = [], 0
        return out

    def _normuon_direction(
        self, O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float, group: dict
    ) -> torch.Tensor:
        """Full-matrix update direction (before -lr) from the orthogonalized update ``O``;
        updates ``v`` in place."""
        m, n = O.shape[-2], O.shape[-1]
        O = O.float()

        # Per-row (per output neuron) EMA of the mean squared update.
        v.lerp_(O.square().mean(dim=-1, keepdim=True), 1.0 - beta2)
        O_hat = O / (v.sqrt() + eps)

        # Per matrix (per expert for 3-D) rescale of the whole update.
        hat_norm = O_hat.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        if group["update_scale"] == "adamw":
            scale = 0.2 * math.sqrt(m * n) / hat_norm
        else:
            scale = O.norm(dim=(-2, -1), keepdim=True) / hat_norm * math.sqrt(max(1.0, m / n))
        return O_hat * scale

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

FSDP2 / expert parallel (DTensor parameters): momentum is element-wise and runs on the local
shard. Orthogonalization needs whole matrices: matrices a rank already holds whole (expert stacks
split along the expert dim) are done where they are; matrices split in rows (FSDP2's Shard(0))
each get one owner rank, which receives the rows and their second moments, computes the update
and sends each holder its rows back (owner_exchange.py), in buckets of ``bucket_mb`` per rank.
So no rank ever holds more than a bucket of whole matrices, and the ranks share the
Newton-Schulz work instead of repeating it. The second moment ([..., m, 1], one value per row)
is a DTensor sharded like its parameter, so DCP saves and reshards it like the momentum.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from .local_shards import local, params_with_grads
from .matrix_layout import MatrixLayout, matrix_layout
from .newton_schulz import iteration_dtype, zeropower_via_newtonschulz5
from .owner_exchange import SplitMatrix, exchange_with_owners

_UPDATE_SCALES = ("adamw", "muon")
# Largest stack of same-shape matrices orthogonalized in one call (elements; 1 GiB in fp32).
NS_BATCH_ELEMENTS = 1 << 28


def _matrices(t: torch.Tensor) -> torch.Tensor:
    """[..., m, n] as a [b, m, n] *view* (in-place writes reach t, whatever its strides)."""
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    raise NotImplementedError(f"NorMuon handles 2-D and 3-D parameters, got shape {tuple(t.shape)}")


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
        bucket_mb: MiB of whole fp32 matrices one rank owns per exchange round (sharded params).

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
        bucket_mb: float = 512.0,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        if update_scale not in _UPDATE_SCALES:
            raise ValueError(f"update_scale must be one of {_UPDATE_SCALES}, got {update_scale!r}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
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
        self.bucket_bytes = int(bucket_mb * 2**20)
        super().__init__(params, defaults)
        self._layouts: dict[torch.Tensor, MatrixLayout] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"NorMuon only handles matrices (ndim >= 2); got shape {tuple(p.shape)}. "
                        "Give vectors/scalars to an element-wise optimizer."
                    )

    def _layout(self, p: torch.Tensor) -> MatrixLayout:
        if p not in self._layouts:
            self._layouts[p] = matrix_layout(p)
        return self._layouts[p]

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # Same type and sharding as p (a DTensor for FSDP2 params).
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            v_shape = (*p.shape[:-1], 1)
            if isinstance(p, DTensor):
                # One value per row, sharded like the rows of p (see module docstring).
                shard = p.to_local()
                zeros = torch.zeros((*shard.shape[:-1], 1), dtype=torch.float32, device=shard.device)
                state["second_moment"] = DTensor.from_local(
                    zeros, p.device_mesh, p.placements, run_check=False, shape=v_shape,
                    stride=torch.empty(v_shape, device="meta").stride(),
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
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1 = group["momentum"]
        params, grads, bufs, seconds = [], [], [], []
        for p, grad in params_with_grads(group):
            state = self._init_state(p)
            params.append(p)
            grads.append(local(grad))
            bufs.append(local(state["momentum_buffer"]))
            seconds.append(local(state["second_moment"]))
        if not params:
            return

        # Momentum is element-wise: on the local shards, all tensors in one foreach call.
        torch._foreach_lerp_(bufs, grads, 1.0 - beta1)

        def blend_into(i: int, out: torch.Tensor) -> None:
            """The momentum-blended update of params[i]'s local matrices, written into `out`."""
            g, buf = _matrices(grads[i]), _matrices(bufs[i])
            if group["nesterov"]:
                torch.lerp(g, buf, beta1, out=out)
            else:
                out.copy_(buf)

        def apply(p_mats: torch.Tensor, O: torch.Tensor, row_factor: torch.Tensor | None) -> None:
            """W = (1 - lr wd) W - lr * row_factor * O in place (no direction tensor);
            row_factor None: O is the direction itself."""
            if wd != 0.0:
                p_mats.mul_(1.0 - lr * wd)
            if row_factor is None:
                p_mats.add_(O.to(p_mats.dtype), alpha=-lr)
            else:
                p_mats.addcmul_(O, row_factor, value=-lr)

        whole_here: list[int] = []
        split_by_group: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            layout = self._layout(p)
            if layout.split:
                split_by_group.setdefault(id(layout.group), []).append(i)
            else:
                whole_here.append(i)

        # Matrices this rank holds whole: orthogonalize here, in same-shape stacks written
        # straight from the momentum (no per-parameter copies), then applied in place.
        for chunk in self._stack_chunks(whole_here, params):
            counts = [_matrices(local(params[i])).shape[0] for i in chunk]
            m, n = params[chunk[0]].shape[-2:]
            U = torch.empty((sum(counts), m, n), dtype=torch.float32, device=grads[chunk[0]].device)
            V = torch.cat([_matrices(seconds[i]) for i in chunk])
            for i, u in zip(chunk, U.split(counts)):
                blend_into(i, u)
            ns_dtype = iteration_dtype(U, self.ns_dtype)
            O = zeropower_via_newtonschulz5(U, steps=group["ns_steps"], dtype=ns_dtype,
                                            out_dtype=ns_dtype)
            del U
            row_factor, V = self._row_factors(O, V, group)
            for i, o, f, v in zip(chunk, O.split(counts), row_factor.split(counts), V.split(counts)):
                _matrices(seconds[i]).copy_(v)
                apply(_matrices(local(params[i])), o, f)
            del O

        # Matrices split in rows: one owner per matrix (owner_exchange.py).
        for members in split_by_group.values():
            matrices = []
            for i in members:
                layout = self._layout(params[i])
                p_mats, v_mats = _matrices(local(params[i])), _matrices(seconds[i])
                for j in range(layout.local_matrices):
                    def rows_here(i=i, j=j, v_mats=v_mats):
                        # rows and their second moments travel together: [rows here, cols + 1]
                        g, buf = _matrices(grads[i])[j], _matrices(bufs[i])[j]
                        u = g.lerp(buf, beta1) if group["nesterov"] else buf
                        return torch.cat([u.float(), v_mats[j]], dim=-1)

                    def take_back(rows, p_j=p_mats[j], v_j=v_mats[j]):
                        v_j.copy_(rows[:, -1:])
                        apply(p_j, rows[:, :-1], None)

                    matrices.append(SplitMatrix(layout, layout.cols + 1, rows_here, take_back))

            def on_owner(whole: list[torch.Tensor]) -> list[torch.Tensor]:
                us = [w[None, :, :-1] for w in whole]
                vs = [w[None, :, -1:] for w in whole]
                return [torch.cat([d[0], v_new[0]], dim=-1)
                        for d, v_new in self._directions(us, vs, group)]

            exchange_with_owners(matrices, on_owner, self.bucket_bytes, grads[members[0]].device)

    @staticmethod
    def _stack_chunks(indices: list[int], params: list[torch.Tensor]) -> list[list[int]]:
        """Indices grouped by matrix shape, each group cut at NS_BATCH_ELEMENTS local elements,
        so a chunk's stacked copies stay bounded."""
        by_shape: dict[tuple, list[int]] = {}
        for i in indices:
            by_shape.setdefault(tuple(params[i].shape[-2:]), []).append(i)
        chunks = []
        for members in by_shape.values():
            chunk, size = [], 0
            for i in members:
                n = local(params[i]).numel()
                if chunk and size + n > NS_BATCH_ELEMENTS:
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(i)
                size += n
            chunks.append(chunk)
        return chunks

    def _directions(self, us: list[torch.Tensor], vs: list[torch.Tensor], group: dict
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """NorMuon update directions (before -lr) and new second moments for stacks of matrices.

        ``us[k]``: [b, m, n] updates, ``vs[k]``: [b, m, 1] second moments. Same-shape matrices
        are stacked (up to NS_BATCH_ELEMENTS) so Newton-Schulz runs as a few large batched
        matmuls; per-matrix results equal separate calls.
        """
        out: list = [None] * len(us)
        buckets: dict[tuple, list[int]] = {}
        for k, u in enumerate(us):
            buckets.setdefault((u.shape[-2], u.shape[-1], u.device, u.dtype), []).append(k)
        for (m, n, _, _), members in buckets.items():
            batch: list[int] = []
            size = 0
            for j, k in enumerate(members):
                batch.append(k)
                size += us[k].numel()
                if size >= NS_BATCH_ELEMENTS or j == len(members) - 1:
                    counts = [us[b].shape[0] for b in batch]
                    U = torch.cat([us[b] for b in batch]) if len(batch) > 1 else us[batch[0]]
                    V = torch.cat([vs[b] for b in batch]) if len(batch) > 1 else vs[batch[0]]
                    O = zeropower_via_newtonschulz5(U, steps=group["ns_steps"], dtype=self.ns_dtype)
                    D, V_new = self._normuon_direction(O, V, group)
                    for b, d, v in zip(batch, D.split(counts), V_new.split(counts)):
                        out[b] = (d, v)
                    batch, size = [], 0
        return out

    @classmethod
    def _normuon_direction(cls, O: torch.Tensor, v: torch.Tensor, group: dict
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update direction (before -lr) from orthogonalized ``O`` [b, m, n] and the new second
        moment, from the old one ``v`` [b, m, 1]."""
        row_factor, v = cls._row_factors(O, v, group)
        return O.float() * row_factor, v

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

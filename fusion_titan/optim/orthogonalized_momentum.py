"""Orthogonalized momentum for matrices, owner-sharded: the part Muon and NorMuon share.

Per matrix W (m x n, rows = output neurons) and step t:

    M = beta1 * M + (1 - beta1) * G              momentum buffer
    U = Nesterov ? (1 - beta1) * G + beta1 * M : M
    O = NS5(U)                                   Newton-Schulz orthogonalization
    W = W - lr * wd * W - lr * f * O

where f is one factor per row or per matrix that the rule gives (`_row_factors`), optionally
from a per-row state of its own (`ROW_STATE`, [..., m, 1] fp32) that it updates on the way:
Muon's f is a shape factor per matrix (muon.py), NorMuon folds its neuron-wise second-moment
normalization into f (normuon.py). Tensors with more than two dims (MoE experts,
[n_experts, out, in]) are a batch of matrices, each orthogonalized and scaled on its own.

FSDP2 / expert parallel (DTensor parameters): momentum is element-wise and runs on the local
shard. Orthogonalization needs whole matrices: matrices a rank already holds whole (expert stacks
split along the expert dim) are done where they are; matrices split in rows (FSDP2's Shard(0))
each get one owner rank, which receives the rows (and their per-row state), computes the update
and sends each holder its rows back (owner_exchange.py), in buckets of ``bucket_mb`` per rank.
So no rank ever holds more than a bucket of whole matrices, and the ranks share the
Newton-Schulz work instead of repeating it. The per-row state is a DTensor sharded like its
parameter, so DCP saves and reshards it like the momentum.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

from .group_stepping import GroupSteppingOptimizer
from .local_shards import local, params_with_grads
from .matrix_layout import MatrixLayout, matrix_layout
from .newton_schulz import iteration_dtype, zeropower_via_newtonschulz5
from .owner_exchange import SplitMatrix, exchange_with_owners

UPDATE_SCALES = ("adamw", "muon")
# Largest stack of same-shape matrices orthogonalized in one call (elements; 1 GiB in fp32).
NS_BATCH_ELEMENTS = 1 << 28


def _matrices(t: torch.Tensor) -> torch.Tensor:
    """[..., m, n] as a [b, m, n] *view* (in-place writes reach t, whatever its strides)."""
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    raise NotImplementedError(f"Muon/NorMuon handle 2-D and 3-D parameters, got shape {tuple(t.shape)}")


def same_shape_batches(keys: list, sizes: list[int]) -> list[list[int]]:
    """Indices grouped by equal key (matrix shape, ...) in first-seen order, each group cut into
    batches for one stacked Newton-Schulz call: a batch closes with the member that brings it to
    NS_BATCH_ELEMENTS elements, so stacked copies stay bounded (by the limit plus one member)."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    batches = []
    for members in by_key.values():
        batch, size = [], 0
        for i in members:
            batch.append(i)
            size += sizes[i]
            if size >= NS_BATCH_ELEMENTS:
                batches.append(batch)
                batch, size = [], 0
        if batch:
            batches.append(batch)
    return batches


class OrthogonalizedMomentum(GroupSteppingOptimizer):
    """Base of Muon and NorMuon: momentum, Newton-Schulz on whole matrices (owner-sharded when
    split), and W -= lr * (wd * W + f * O). Subclasses set ROW_STATE and `_row_factors`.

    ``defaults`` must hold lr, momentum, weight_decay, nesterov, ns_steps and update_scale (plus
    what `_row_factors` reads); groups may override each. ``ns_dtype``: dtype of the Newton-Schulz
    iterations (None = bf16 on CUDA, fp32 otherwise). ``bucket_mb``: MiB of whole fp32 matrices
    one rank owns per exchange round (row-split parameters).
    """

    # name of a per-row fp32 state ([..., m, 1]) that travels with the rows, or None
    ROW_STATE: str | None = None

    def __init__(self, params: Iterable, defaults: dict, ns_dtype: torch.dtype | None,
                 bucket_mb: float):
        name = type(self).__name__
        if defaults["lr"] < 0.0:
            raise ValueError(f"Invalid learning rate: {defaults['lr']}")
        if not 0.0 <= defaults["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum: {defaults['momentum']}")
        if defaults["update_scale"] not in UPDATE_SCALES:
            raise ValueError(f"update_scale must be one of {UPDATE_SCALES}, got {defaults['update_scale']!r}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.ns_dtype = ns_dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        super().__init__(params, defaults)
        self._layouts: dict[torch.Tensor, MatrixLayout] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"{name} only handles matrices (ndim >= 2); got shape {tuple(p.shape)}. "
                        "Give vectors/scalars to an element-wise optimizer."
                    )

    @staticmethod
    def _row_factors(O: torch.Tensor, row_state: torch.Tensor | None, group: dict
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Factors f ([b, m, 1] or [b, 1, 1]) with update direction f * O for orthogonalized
        ``O`` [b, m, n], and the new per-row state from the old ``row_state`` ([b, m, 1] or None)."""
        raise NotImplementedError

    @classmethod
    def _direction(cls, O: torch.Tensor, row_state: torch.Tensor | None, group: dict
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update direction (before -lr) from orthogonalized ``O`` and the new per-row state."""
        factor, row_state = cls._row_factors(O, row_state, group)
        return O.float() * factor, row_state

    def _layout(self, p: torch.Tensor) -> MatrixLayout:
        if p not in self._layouts:
            self._layouts[p] = matrix_layout(p)
        return self._layouts[p]

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # Same type and sharding as p (a DTensor for FSDP2 params).
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.ROW_STATE is not None:
                state[self.ROW_STATE] = _per_row_zeros(p)
        return state

    def _step_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1 = group["momentum"]
        has_rows = self.ROW_STATE is not None
        params, grads, bufs, row_states = [], [], [], []
        for p, grad in params_with_grads(group):
            state = self._init_state(p)
            params.append(p)
            grads.append(local(grad))
            bufs.append(local(state["momentum_buffer"]))
            row_states.append(local(state[self.ROW_STATE]) if has_rows else None)
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

        def apply(p_mats: torch.Tensor, O: torch.Tensor, factor: torch.Tensor | None) -> None:
            """W = (1 - lr wd) W - lr * factor * O in place (no direction tensor);
            factor None: O is the direction itself."""
            if wd != 0.0:
                p_mats.mul_(1.0 - lr * wd)
            if factor is None:
                p_mats.add_(O.to(p_mats.dtype), alpha=-lr)
            else:
                p_mats.addcmul_(O, factor, value=-lr)

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
        batches = same_shape_batches([tuple(params[i].shape[-2:]) for i in whole_here],
                                     [local(params[i]).numel() for i in whole_here])
        for chunk in ([whole_here[k] for k in batch] for batch in batches):
            counts = [_matrices(local(params[i])).shape[0] for i in chunk]
            m, n = params[chunk[0]].shape[-2:]
            U = torch.empty((sum(counts), m, n), dtype=torch.float32, device=grads[chunk[0]].device)
            V = torch.cat([_matrices(row_states[i]) for i in chunk]) if has_rows else None
            for i, u in zip(chunk, U.split(counts)):
                blend_into(i, u)
            ns_dtype = iteration_dtype(U, self.ns_dtype)
            O = zeropower_via_newtonschulz5(U, steps=group["ns_steps"], dtype=ns_dtype,
                                            out_dtype=ns_dtype)
            del U
            factors, V = self._row_factors(O, V, group)
            V_parts = V.split(counts) if has_rows else [None] * len(chunk)
            for i, o, f, v in zip(chunk, O.split(counts), factors.split(counts), V_parts):
                if has_rows:
                    _matrices(row_states[i]).copy_(v)
                apply(_matrices(local(params[i])), o, f)
            del O

        # Matrices split in rows: one owner per matrix (owner_exchange.py).
        for members in split_by_group.values():
            matrices = []
            for i in members:
                layout = self._layout(params[i])
                cols = layout.cols
                p_mats = _matrices(local(params[i]))
                v_mats = _matrices(row_states[i]) if has_rows else None
                for j in range(layout.local_matrices):
                    def rows_here(i=i, j=j, v_mats=v_mats):
                        # rows and their per-row state travel together: [rows here, cols (+ 1)]
                        g, buf = _matrices(grads[i])[j], _matrices(bufs[i])[j]
                        u = (g.lerp(buf, beta1) if group["nesterov"] else buf).float()
                        return torch.cat([u, v_mats[j]], dim=-1) if has_rows else u

                    def take_back(rows, p_j=p_mats[j], v_mats=v_mats, j=j, cols=cols):
                        if has_rows:
                            v_mats[j].copy_(rows[:, cols:])
                        apply(p_j, rows[:, :cols], None)

                    matrices.append(SplitMatrix(layout, cols + int(has_rows), rows_here, take_back))

            def on_owner(whole: list[torch.Tensor]) -> list[torch.Tensor]:
                # [rows, cols (+ 1)]: the matrix, then its per-row state
                us = [w[None, :, :w.shape[-1] - int(has_rows)] for w in whole]
                vs = [w[None, :, -1:] if has_rows else None for w in whole]
                return [torch.cat([d[0], v_new[0]], dim=-1) if has_rows else d[0]
                        for d, v_new in self._directions(us, vs, group)]

            exchange_with_owners(matrices, on_owner, self.bucket_bytes, grads[members[0]].device)

    def _directions(self, us: list[torch.Tensor], vs: list[torch.Tensor | None], group: dict
                    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Update directions (before -lr) and new per-row states for stacks of matrices.

        ``us[k]``: [b, m, n] updates, ``vs[k]``: [b, m, 1] per-row states (None without
        ROW_STATE). Same-shape matrices are stacked (same_shape_batches) so Newton-Schulz runs
        as a few large batched matmuls; per-matrix results equal separate calls.
        """
        out: list = [None] * len(us)
        keys = [(u.shape[-2], u.shape[-1], u.device, u.dtype) for u in us]
        for batch in same_shape_batches(keys, [u.numel() for u in us]):
            counts = [us[b].shape[0] for b in batch]
            U = torch.cat([us[b] for b in batch]) if len(batch) > 1 else us[batch[0]]
            V = None
            if vs[batch[0]] is not None:
                V = torch.cat([vs[b] for b in batch]) if len(batch) > 1 else vs[batch[0]]
            O = zeropower_via_newtonschulz5(U, steps=group["ns_steps"], dtype=self.ns_dtype)
            D, V_new = self._direction(O, V, group)
            V_parts = V_new.split(counts) if V_new is not None else [None] * len(batch)
            for b, d, v in zip(batch, D.split(counts), V_parts):
                out[b] = (d, v)
        return out


def _per_row_zeros(p: torch.Tensor) -> torch.Tensor:
    """fp32 zeros of shape [..., m, 1]: one value per row of p, sharded like p's rows."""
    v_shape = (*p.shape[:-1], 1)
    if not isinstance(p, DTensor):
        return torch.zeros(v_shape, dtype=torch.float32, device=p.device)
    shard = p.to_local()
    zeros = torch.zeros((*shard.shape[:-1], 1), dtype=torch.float32, device=shard.device)
    return DTensor.from_local(zeros, p.device_mesh, p.placements, run_check=False, shape=v_shape,
                              stride=torch.empty(v_shape, device="meta").stride())

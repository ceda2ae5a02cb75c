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

Host cost: on a GPU every op is a kernel launch and microseconds of Python and dispatch, and a
step of small ops is host-bound. So the step issues ops per same-shape batch, not per
parameter: the batch's matrices are views of one stacked tensor, and the element-wise work on
the parameters' own tensors (blend, weight decay, update, per-row state) is one foreach op over
the batch (or over the group); row-split matrices likewise per bucket and shape
(owner_exchange.py). The update is applied as a direction tensor f * O of the batch (fp32, no
larger than the stacked U freed before it), which foreach adds in one op.
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


def _matrix_count(t: torch.Tensor) -> int:
    """Matrices in a [m, n] or [b, m, n] tensor."""
    if t.ndim == 2:
        return 1
    if t.ndim == 3:
        return t.shape[0]
    raise NotImplementedError(f"Muon/NorMuon handle 2-D and 3-D parameters, got shape {tuple(t.shape)}")


def _views_like(stack: torch.Tensor, members: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `stack` ([b, ...], the members' matrices one after another) shaped like each
    member ([m, ...] or [c, m, ...]), with at most two view ops however many members."""
    counts = [_matrix_count(t) for t in members]
    matrices = stack.unbind(0) if any(t.ndim == 2 for t in members) else ()
    stacks = stack.split(counts) if any(t.ndim == 3 for t in members) else ()
    views, start = [], 0
    for k, (t, count) in enumerate(zip(members, counts)):
        views.append(matrices[start] if t.ndim == 2 else stacks[k])
        start += count
    return views


def _per_matrix(t: torch.Tensor) -> list[torch.Tensor]:
    """The [m, n] matrices of a [m, n] or [b, m, n] tensor (no op for a 2-D one)."""
    return [t] if t.ndim == 2 else list(t.unbind(0))


def _write_updates(targets: list[torch.Tensor], grads: list[torch.Tensor],
                   bufs: list[torch.Tensor], group: dict) -> None:
    """targets (fp32) = the momentum-blended updates: Nesterov's lerp(grad, momentum, beta1) in
    the gradients' dtype, else the momentum. Two foreach ops for any number of tensors."""
    if group["nesterov"]:
        torch._foreach_copy_(targets, torch._foreach_lerp(grads, bufs, group["momentum"]))
    else:
        torch._foreach_copy_(targets, bufs)


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
        # one fp32 (or wider) product; a bf16 O is read as it is, not copied to fp32 first
        return torch.mul(O, factor), row_state

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
        """One step for `group` in a few foreach / batched ops per same-shape batch (the step is
        host-bound on a GPU when it launches ops per parameter)."""
        has_rows = self.ROW_STATE is not None
        params, grads, bufs, row_states, layouts = [], [], [], [], []
        for p, grad in params_with_grads(group):
            state = self._init_state(p)
            params.append(local(p))
            grads.append(local(grad))
            bufs.append(local(state["momentum_buffer"]))
            row_states.append(local(state[self.ROW_STATE]) if has_rows else None)
            layouts.append(self._layout(p))
        if not params:
            return

        # Momentum is element-wise: on the local shards, all tensors in one foreach call.
        torch._foreach_lerp_(bufs, grads, 1.0 - group["momentum"])
        # Decoupled weight decay, W -= lr * wd * W: also element-wise, and nothing below reads W
        # before the update is added to it.
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])

        whole_here = [i for i, layout in enumerate(layouts) if not layout.split]
        batches = same_shape_batches([tuple(params[i].shape[-2:]) for i in whole_here],
                                     [params[i].numel() for i in whole_here])
        for batch in batches:
            chunk = [whole_here[k] for k in batch]
            self._update_whole([params[i] for i in chunk], [grads[i] for i in chunk],
                               [bufs[i] for i in chunk],
                               [row_states[i] for i in chunk] if has_rows else None, group)

        split_by_group: dict[int, list[int]] = {}
        for i, layout in enumerate(layouts):
            if layout.split:
                split_by_group.setdefault(id(layout.group), []).append(i)
        for members in split_by_group.values():
            self._update_split([layouts[i] for i in members], [params[i] for i in members],
                               [grads[i] for i in members], [bufs[i] for i in members],
                               [row_states[i] for i in members] if has_rows else None, group)

    def _update_whole(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                      bufs: list[torch.Tensor], row_states: list[torch.Tensor] | None,
                      group: dict) -> None:
        """W -= lr * f * O for a batch of same-shape matrices this rank holds whole (local
        tensors): stacked into one Newton-Schulz call, written back with foreach ops."""
        m, n = params[0].shape[-2:]
        count = sum(_matrix_count(p) for p in params)
        U = torch.empty((count, m, n), dtype=torch.float32, device=params[0].device)
        _write_updates(_views_like(U, params), grads, bufs, group)
        V = None
        if row_states is not None:
            V = torch.empty((count, m, 1), dtype=torch.float32, device=U.device)
            torch._foreach_copy_(_views_like(V, row_states), row_states)
        ns_dtype = iteration_dtype(U, self.ns_dtype)
        O = zeropower_via_newtonschulz5(U, steps=group["ns_steps"], dtype=ns_dtype,
                                        out_dtype=ns_dtype)
        del U
        D, V = self._direction(O, V, group)
        del O
        if row_states is not None:
            torch._foreach_copy_(row_states, _views_like(V, row_states))
        if D.dtype != params[0].dtype:  # foreach on mixed dtypes falls back to a kernel per tensor
            D = D.to(params[0].dtype)
        torch._foreach_add_(params, _views_like(D, params), alpha=-group["lr"])

    def _update_split(self, layouts: list[MatrixLayout], params: list[torch.Tensor],
                      grads: list[torch.Tensor], bufs: list[torch.Tensor],
                      row_states: list[torch.Tensor] | None, group: dict) -> None:
        """W -= lr * f * O for parameters split in rows over one process group (local tensors):
        each matrix is made whole on one owner (owner_exchange.py). Their rows and per-row
        states travel as two payload parts, [rows, cols] and [rows, 1]."""
        def matrices_of(tensors):
            return [m for t in tensors for m in _per_matrix(t)]

        p_mats, g_mats, buf_mats = matrices_of(params), matrices_of(grads), matrices_of(bufs)
        v_mats = matrices_of(row_states) if row_states is not None else None
        side = () if v_mats is None else (1,)  # the per-row state's column
        matrices = [SplitMatrix(layout, (layout.cols, *side))
                    for layout, p in zip(layouts, params) for _ in range(_matrix_count(p))]

        def fill(members: list[int], parts: list[list[torch.Tensor]]) -> None:
            _write_updates(parts[0], [g_mats[i] for i in members], [buf_mats[i] for i in members],
                           group)
            if v_mats is not None:
                torch._foreach_copy_(parts[1], [v_mats[i] for i in members])

        def compute(stacks: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
            directions = self._directions([(s[0], s[1] if v_mats is not None else None)
                                           for s in stacks], group)
            return [[d] if v is None else [d, v] for d, v in directions]

        def take_back(members: list[int], parts: list[list[torch.Tensor]]) -> None:
            if v_mats is not None:
                torch._foreach_copy_([v_mats[i] for i in members], parts[1])
            targets = [p_mats[i] for i in members]
            directions = [d if d.dtype == w.dtype else d.to(w.dtype)
                          for d, w in zip(parts[0], targets)]
            torch._foreach_add_(targets, directions, alpha=-group["lr"])

        exchange_with_owners(matrices, fill, compute, take_back, self.bucket_bytes,
                             params[0].device)

    def _directions(self, stacks: list[tuple[torch.Tensor, torch.Tensor | None]], group: dict
                    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Update directions (before -lr) and new per-row states for stacks of same-shape
        matrices ([b, m, n] updates with [b, m, 1] per-row states, or None without ROW_STATE).

        Each stack is orthogonalized in batched Newton-Schulz calls of at most about
        NS_BATCH_ELEMENTS elements (same_shape_batches' cuts); per-matrix results equal
        separate calls.
        """
        out = []
        for U, V in stacks:
            batches = same_shape_batches([None] * U.shape[0], [U.shape[1] * U.shape[2]] * U.shape[0])
            pieces = []
            for batch in batches:
                start, stop = batch[0], batch[-1] + 1
                O = zeropower_via_newtonschulz5(U[start:stop], steps=group["ns_steps"],
                                                dtype=self.ns_dtype)
                pieces.append(self._direction(O, None if V is None else V[start:stop], group))
            if len(pieces) == 1:
                out.append(pieces[0])
                continue
            D = torch.cat([d for d, _ in pieces])
            out.append((D, None if V is None else torch.cat([v for _, v in pieces])))
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

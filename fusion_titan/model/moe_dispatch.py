"""MoE token permutation without host synchronisation: (token, slot) assignments -> expert rows.

`RowLayout` places the kept assignments of one MoE call into a static [rows, dim] buffer grouped
by expert, each expert's group padded to a multiple of `align` rows (zero rows), so the grouped
GEMM gets aligned groups and every shape is known before the step runs: no `.item()`, no
`.tolist()`, no data-dependent output size, so the whole dispatch compiles with fullgraph=True
and can be captured by CUDA graphs. rows = min(N*k, E*capacity) + E*(align-1).

Both directions are gathers, in forward and backward (`gather_rows`): the token -> rows copy's
backward sums each token's k rows (a gather + sum over k, no atomic scatter-add), and the rows ->
slots copy's backward is the inverse permutation. This replaces torchtitan 0.2.2's path
(argsort + index, its Triton `generate_permute_indices` padding, a second gather, a scatter,
a third gather, and `index_put` with accumulation in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _masked_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] with zero rows where index < 0."""
    picked = x.index_select(0, index.clamp_min(0))
    return torch.where((index >= 0).unsqueeze(-1), picked, 0.0)


class _GatherRows(torch.autograd.Function):
    """out[r] = x[index[r]] (0 where index[r] < 0); backward is a gather through `inverse`.

    `inverse` [x.shape[0] * group] lists, for every source row s and each of its `group` copies,
    the output row holding it (-1: not copied); grad_x[s] = sum of grad_out over those rows.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, group: int):
        ctx.save_for_backward(inverse)
        ctx.group = group
        return _masked_gather(x, index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        grad = _masked_gather(grad_out, inverse)
        if ctx.group > 1:
            grad = grad.view(-1, ctx.group, grad.shape[-1]).sum(1)
        return grad, None, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, group: int = 1):
    return _GatherRows.apply(x, index, inverse, group)


@dataclass
class RowLayout:
    """Where each assignment goes. A = N*k assignments in (token, slot) order, R rows.

    row_of_slot [A]: the row of each assignment (-1: dropped by capacity).
    token_of_row [R]: the token each row copies (-1: padding). slot_of_row [R]: its assignment.
    group_sizes [E]: rows of each expert's padded group (rows past their sum: not computed).
    """

    row_of_slot: torch.Tensor
    token_of_row: torch.Tensor
    slot_of_row: torch.Tensor
    group_sizes: torch.Tensor

    @property
    def n_rows(self) -> int:
        return self.token_of_row.shape[0]


def padded_row_count(n_assignments: int, n_experts: int, capacity: int, align: int) -> int:
    """Static row count: every kept assignment plus the worst-case padding of E groups."""
    kept = min(n_assignments, n_experts * capacity) if capacity > 0 else n_assignments
    return kept + n_experts * (align - 1)


def row_layout(flat_experts: torch.Tensor, kept_counts: torch.Tensor, top_k: int,
               keep: torch.Tensor | None, capacity: int, align: int) -> RowLayout:
    """The padded, expert-grouped layout of one call's assignments (static shapes, no host sync).

    flat_experts [A] expert of each assignment; kept_counts [E] assignments each expert computes;
    keep [A] bool or None (all kept); capacity 0 = unlimited; align >= 1 rows per group multiple.
    Within an expert, assignments keep (token, slot) order.
    """
    n_experts = kept_counts.shape[0]
    n_assign = flat_experts.shape[0]
    device = flat_experts.device
    n_rows = padded_row_count(n_assign, n_experts, capacity, align)
    key = flat_experts if keep is None else flat_experts.masked_fill(~keep, n_experts)
    order = torch.argsort(key, stable=True)  # assignments grouped by expert, dropped last
    sorted_expert = key[order]
    counts = kept_counts.to(torch.int64)
    padded = (counts + (align - 1)) // align * align
    group_end = torch.cumsum(padded, 0)
    unpadded_start = torch.cumsum(counts, 0) - counts
    expert = sorted_expert.clamp(max=n_experts - 1)
    rank = torch.arange(n_assign, device=device) - unpadded_start[expert]
    row = group_end[expert] - padded[expert] + rank
    kept = sorted_expert < n_experts
    row = torch.where(kept, row, -1)
    row_of_slot = torch.empty_like(row).scatter_(0, order, row)
    # Dropped assignments write into one spare row past the end, cut off afterwards.
    target = torch.where(kept, row, n_rows)
    token_of_row = torch.full((n_rows + 1,), -1, dtype=torch.int64, device=device)
    token_of_row = token_of_row.scatter(0, target, order // top_k)[:n_rows]
    slot_of_row = torch.full((n_rows + 1,), -1, dtype=torch.int64, device=device)
    slot_of_row = slot_of_row.scatter(0, target, order)[:n_rows]
    return RowLayout(row_of_slot, token_of_row, slot_of_row, padded)


def dispatch(x: torch.Tensor, layout: RowLayout, top_k: int) -> torch.Tensor:
    """x [N, dim] -> expert rows [R, dim] (padding rows zero)."""
    return gather_rows(x, layout.token_of_row, layout.row_of_slot, top_k)


def combine(rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """Expert output rows [R, dim] -> per-assignment outputs [N*k, dim] (dropped ones zero)."""
    return gather_rows(rows, layout.row_of_slot, layout.slot_of_row, 1)

"""Owner-sharded matrix work: each split matrix is made whole on one rank only.

Under FSDP2 every rank holds a block of rows of each matrix. A matrix optimizer needs the whole
matrix, but gathering every matrix on every rank (an all-gather per parameter) costs the full
model in transient memory on each rank and repeats the same Newton-Schulz work F times. Here each
matrix gets one *owner* among the ranks that hold its rows (the same idea as torchtitan's DistMuon
after 0.2.2, microsoft/dion's distributed Muon/NorMuon, and Moonlight's ZeRO-1 Muon):

1. every rank sends its rows of each matrix (plus any per-row side data, e.g. NorMuon's second
   moment) to the matrix's owner — one `all_to_all_single` per bucket;
2. owners compute on whole matrices, all ranks at once on disjoint matrices;
3. the results' rows go back to the ranks that hold them — a second `all_to_all_single`.

Buckets take matrices in a fixed order until the whole matrices in flight reach
`bucket_bytes` per rank (about what one owner holds at a time, so transient memory stays
bounded), and inside a bucket owners are chosen greedily by load, so ranks do equal work. Piece
sizes follow from the layouts (matrix_layout.py): nothing but the payload is communicated.
Ranks with an empty share still take part in the collectives.

The host cost stays per bucket, not per matrix (the step is host-bound on a GPU otherwise): in
the flat buffers, matrices of one shape going to one rank lie side by side, one contiguous
[matrices, rows, width] block per payload part, so an owner's whole matrices of a shape are one
`cat` of the ranks' blocks (a ready Newton-Schulz stack), and the callers read and write every
matrix's rows of a bucket with a few foreach ops over views of those blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .matrix_layout import MatrixLayout


@dataclass(frozen=True)
class SplitMatrix:
    """One row-split matrix whose payload is `widths` columns per part (its cols, then any side
    columns, e.g. NorMuon's second moment), each part a [rows, width] float32 block."""

    layout: MatrixLayout
    widths: tuple[int, ...]

    @property
    def width(self) -> int:
        return sum(self.widths)

    def piece_numel(self, rank: int) -> int:
        return self.layout.row_count(rank) * self.width


# fill(members, parts): write this rank's rows of matrices[members[q]], part k, into parts[k][q]
# ([rows here, widths[k]] float32 views). take_back(members, parts): the same views of the
# owner's results. compute(stacks): stacks[c][k] is part k of same-shape whole matrices
# [count, rows, widths[k]]; returns results of the same shapes.
Rows = Callable[[list[int], list[list[torch.Tensor]]], None]
Compute = Callable[[list[list[torch.Tensor]]], list[list[torch.Tensor]]]


def plan_buckets(matrices: list[SplitMatrix], bucket_bytes: int) -> list[tuple[list[int], list[int]]]:
    """Split matrices (all of one process group) into buckets; owners balanced inside each.

    Returns [(matrix indices, owner of each)], the same on every rank (depends on shapes only).
    """
    if not matrices:
        return []
    group_size = matrices[0].layout.group_size
    buckets: list[tuple[list[int], list[int]]] = []
    members: list[int] = []
    load = [0] * group_size
    owners: list[int] = []
    for i, m in enumerate(matrices):
        size = m.layout.rows * m.width * 4
        owner = min(range(group_size), key=lambda r: (load[r], r))
        if members and load[owner] + size > bucket_bytes:
            buckets.append((members, owners))
            members, owners, load = [], [], [0] * group_size
            owner = 0
        members.append(i)
        owners.append(owner)
        load[owner] += size
    buckets.append((members, owners))
    return buckets


def exchange_with_owners(matrices: list[SplitMatrix], fill: Rows, compute: Compute,
                         take_back: Rows, bucket_bytes: int, device: torch.device) -> None:
    """For matrices split over one process group: gather each whole on its owner, run `compute`
    on the owner's whole matrices there, and hand every rank its rows of each result
    (`take_back`); `fill` supplies this rank's rows. One call of each per bucket."""
    if not matrices:
        return
    layout0 = matrices[0].layout
    group, me, size = layout0.group, layout0.group_rank, layout0.group_size
    n_parts = len(matrices[0].widths)  # the same for all (one caller, one payload)

    for members, owners in plan_buckets(matrices, bucket_bytes):
        classes = _same_shape_classes(matrices, members)
        owner_of = dict(zip(members, owners))
        # owned[r][c]: the matrices of class c that rank r owns, in bucket order
        owned = [[[i for i in cls if owner_of[i] == r] for cls in classes] for r in range(size)]
        mine = owned[me]

        # 1. my rows to the owners: to rank r go my rows of what r owns, class by class.
        send_sizes = [_segment_numel(matrices, owned[r], me) for r in range(size)]
        recv_sizes = [_segment_numel(matrices, mine, r) for r in range(size)]
        send = torch.empty(sum(send_sizes), dtype=torch.float32, device=device)
        send_blocks = _blocks(send, matrices, [(owned[r], me) for r in range(size)])
        order, parts = _rows_of_each(send_blocks, owned, n_parts)
        fill(order, parts)
        received = _all_to_all(send, send_sizes, recv_sizes, group, device)
        del send, send_blocks, parts

        # 2. whole matrices on their owner: rank r's rows come in rank order.
        by_rank = _blocks(received, matrices, [(mine, r) for r in range(size)])
        computed = [c for c, cls in enumerate(mine) if cls]
        whole = [[torch.cat([by_rank[r][c][k] for r in range(size)], dim=1)
                  for k in range(n_parts)] for c in computed]
        del received, by_rank
        results = dict(zip(computed, compute(whole))) if whole else {}
        del whole

        # 3. rows back to their holders, in the layout they were sent in.
        back = torch.empty(sum(recv_sizes), dtype=torch.float32, device=device)
        targets, sources = [], []
        for r, blocks in enumerate(_blocks(back, matrices, [(mine, r) for r in range(size)])):
            for c, parts_c in enumerate(blocks):
                start, stop = matrices[mine[c][0]].layout.row_range(r) if parts_c else (0, 0)
                for k, block in enumerate(parts_c):
                    targets.append(block)
                    sources.append(results[c][k][:, start:stop])
        if targets:
            torch._foreach_copy_(targets, sources)
        del results, targets, sources
        returned = _all_to_all(back, recv_sizes, send_sizes, group, device)
        del back
        order, parts = _rows_of_each(
            _blocks(returned, matrices, [(owned[r], me) for r in range(size)]), owned, n_parts)
        take_back(order, parts)


def _same_shape_classes(matrices: list[SplitMatrix], members: list[int]) -> list[list[int]]:
    """`members` grouped by (rows, widths), first-seen order (the same on every rank)."""
    by_shape: dict[tuple, list[int]] = {}
    for i in members:
        by_shape.setdefault((matrices[i].layout.rows, matrices[i].widths), []).append(i)
    return list(by_shape.values())


def _segment_numel(matrices: list[SplitMatrix], classes: list[list[int]], rank: int) -> int:
    return sum(matrices[i].piece_numel(rank) for cls in classes for i in cls)


def _blocks(flat: torch.Tensor, matrices: list[SplitMatrix],
            segments: list[tuple[list[list[int]], int]]) -> list[list[list[torch.Tensor]]]:
    """Views of `flat`, laid out segment by segment: segment (classes, rank) holds, class by
    class and part by part, rank `rank`'s rows of the class's matrices as one block
    [matrices, rows, width]. Returns blocks[segment][class][part] (no parts for an empty class)."""
    shapes = [[[(len(cls), matrices[cls[0]].layout.row_count(rank), w)
                for w in matrices[cls[0]].widths] if cls else [] for cls in classes]
              for classes, rank in segments]
    sizes = [math.prod(s) for segment in shapes for per_class in segment for s in per_class]
    pieces = iter(flat.split(sizes) if sizes else ())
    return [[[next(pieces).view(s) for s in per_class] for per_class in segment]
            for segment in shapes]


def _rows_of_each(blocks: list[list[list[torch.Tensor]]], owned: list[list[list[int]]],
                  n_parts: int) -> tuple[list[int], list[list[torch.Tensor]]]:
    """Per matrix views ([rows, width] per part) of blocks[r][c][k], which hold owned[r][c]:
    (matrix indices, parts[k][q] for the q-th of them)."""
    order: list[int] = []
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_parts)]
    for per_rank, owned_r in zip(blocks, owned):
        for per_class, cls in zip(per_rank, owned_r):
            order.extend(cls)
            for k, block in enumerate(per_class):
                parts[k].extend(block.unbind(0))
    return order, parts


def _all_to_all(flat_send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int],
                group, device) -> torch.Tensor:
    """One all_to_all_single; returns what each rank sent us, flat, in rank order.

    The receive buffer is zero-filled, not empty: under torchtitan's fake backend (one process
    playing rank 0 of a large plan) collectives move nothing, and zeros keep the math finite.
    """
    recv = torch.zeros(sum(recv_sizes), dtype=torch.float32, device=device)
    dist.all_to_all_single(recv, flat_send, output_split_sizes=recv_sizes,
                           input_split_sizes=send_sizes, group=group)
    return recv

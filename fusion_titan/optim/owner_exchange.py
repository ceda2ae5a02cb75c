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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .matrix_layout import MatrixLayout


@dataclass
class SplitMatrix:
    """One row-split matrix of `width` columns (its cols plus any side columns).

    Its rows are produced and consumed lazily, bucket by bucket, so only one bucket's data
    exists at a time: `rows_here()` gives this rank's rows ([rows here, width], float32) when
    the bucket is sent, `take_back(rows)` receives this rank's rows of the owner's result.
    """

    layout: MatrixLayout
    width: int
    rows_here: Callable[[], torch.Tensor]
    take_back: Callable[[torch.Tensor], None]

    def piece_numel(self, rank: int) -> int:
        return self.layout.row_count(rank) * self.width


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


def exchange_with_owners(
    matrices: list[SplitMatrix],
    compute: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    bucket_bytes: int,
    device: torch.device,
) -> None:
    """For matrices split over one process group: gather each whole on its owner, run
    `compute(list of whole [rows, width] matrices) -> results of the same shapes` there, and
    hand every rank its rows of each result (`take_back`)."""
    if not matrices:
        return
    layout0 = matrices[0].layout
    group, me, size = layout0.group, layout0.group_rank, layout0.group_size

    for members, owners in plan_buckets(matrices, bucket_bytes):
        mine = [i for i, o in zip(members, owners) if o == me]
        of_rank = [[i for i, o in zip(members, owners) if o == r] for r in range(size)]

        # 1. rows to owners: to rank r go my rows of the matrices r owns, in bucket order.
        send = [[matrices[i].rows_here().reshape(-1) for i in of_rank[r]] for r in range(size)]
        send_sizes = [sum(matrices[i].piece_numel(me) for i in of_rank[r]) for r in range(size)]
        recv_sizes = [sum(matrices[i].piece_numel(r) for i in mine) for r in range(size)]
        received = _all_to_all(send, send_sizes, recv_sizes, group, device)
        del send

        # Whole matrices: rank r's rows come in rank order, so concatenating restores them.
        by_rank = [_split(received[r], [matrices[i].piece_numel(r) for i in mine])
                   for r in range(size)]
        whole = [torch.cat([by_rank[r][k].view(-1, matrices[i].width) for r in range(size)])
                 for k, i in enumerate(mine)]
        del received, by_rank
        results = compute(whole) if whole else []
        del whole

        # 3. rows back to their holders.
        back = [[res[slice(*matrices[i].layout.row_range(r))].reshape(-1)
                 for i, res in zip(mine, results)] for r in range(size)]
        del results
        returned = _all_to_all(back, recv_sizes, send_sizes, group, device)
        del back
        for r in range(size):
            parts = _split(returned[r], [matrices[i].piece_numel(me) for i in of_rank[r]])
            for i, part in zip(of_rank[r], parts):
                matrices[i].take_back(part.view(-1, matrices[i].width))


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(flat.split(sizes)) if sizes else []


def _all_to_all(send: list[list[torch.Tensor]], send_sizes: list[int], recv_sizes: list[int],
                group, device) -> list[torch.Tensor]:
    """One all_to_all_single; returns what each rank sent us, flat.

    The receive buffer is zero-filled, not empty: under torchtitan's fake backend (one process
    playing rank 0 of a large plan) collectives move nothing, and zeros keep the math finite.
    """
    flat_send = torch.cat([t for parts in send for t in parts]) if sum(send_sizes) else \
        torch.zeros(0, dtype=torch.float32, device=device)
    recv = torch.zeros(sum(recv_sizes), dtype=torch.float32, device=device)
    dist.all_to_all_single(recv, flat_send, output_split_sizes=recv_sizes,
                           input_split_sizes=send_sizes, group=group)
    return list(recv.split(recv_sizes))

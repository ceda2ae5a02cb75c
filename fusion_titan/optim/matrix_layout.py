"""Where each matrix of a (possibly sharded) parameter lives: whole on this rank, or split in rows.

A matrix optimizer (NorMuon, Muon) needs every matrix whole. A parameter is one matrix ([m, n])
or a stack of them ([..., m, n], MoE experts). Under FSDP2 / expert parallel a parameter is a
DTensor whose mesh dims each either

* replicate it (HSDP's replicate dim): every replica does the same work, nothing to gather;
* split the stack dim 0 of a 3-D parameter (expert parallel, or FSDP on expert stacks): whole
  matrices land on each rank, so they can be orthogonalized where they are;
* split inside the matrices (FSDP's Shard(0) of a 2-D weight, Shard(1) of an expert stack):
  each rank of that mesh dim holds a contiguous block of rows of every matrix of its stack.

At most one mesh dim may split inside the matrices (FSDP2 shards one dim). Along it FSDP2 cuts
with `torch.chunk` semantics: ceil(rows / F) rows per rank, the last ranks possibly short or
empty. `MatrixLayout` records that split, so the owner-sharded exchange (owner_exchange.py) can
compute every rank's piece sizes without communicating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard


@dataclass(frozen=True)
class MatrixLayout:
    """How the local tensor of one parameter maps onto its matrices.

    local_matrices: matrices in this rank's local tensor (product of the stack dims).
    rows, cols: full size of each matrix.
    group: process group of the mesh dim that splits rows inside the matrices (None: whole here).
    group_rank, group_size: this rank's index in it and its size.
    """

    local_matrices: int
    rows: int
    cols: int
    group: dist.ProcessGroup | None = None
    group_rank: int = 0
    group_size: int = 1

    @property
    def split(self) -> bool:
        return self.group is not None and self.group_size > 1

    def row_range(self, rank: int) -> tuple[int, int]:
        """Rows [start, stop) of every matrix that group rank `rank` holds (torch.chunk cuts)."""
        if not self.split:
            return 0, self.rows
        per_rank = math.ceil(self.rows / self.group_size)
        start = min(self.rows, rank * per_rank)
        return start, min(self.rows, start + per_rank)

    def row_count(self, rank: int) -> int:
        start, stop = self.row_range(rank)
        return stop - start


def matrix_layout(p: torch.Tensor) -> MatrixLayout:
    """The layout of parameter `p` (a plain tensor or an FSDP2 / expert-parallel DTensor)."""
    if p.ndim < 2:
        raise ValueError(f"a matrix optimizer needs ndim >= 2, got shape {tuple(p.shape)}")
    rows, cols = p.shape[-2], p.shape[-1]
    if not isinstance(p, DTensor):
        return MatrixLayout(math.prod(p.shape[:-2]), rows, cols)

    local = p.to_local()
    split_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate) or p.device_mesh.size(mesh_dim) == 1:
            continue
        if not isinstance(placement, (Shard, _StridedShard)):  # Partial: never for a parameter
            raise NotImplementedError(
                f"a matrix optimizer cannot handle a parameter placed as {p.placements}")
        if p.ndim >= 3 and placement.dim == 0:
            # splits the stack (FSDP over expert-parallel experts is a strided split of dim 0):
            # whole matrices per rank
            continue
        if isinstance(placement, _StridedShard):
            raise NotImplementedError(
                f"parameter of shape {tuple(p.shape)} placed as {p.placements}: strided row "
                "splits are not supported by NorMuon/Muon")
        if placement.dim >= p.ndim - 1:
            raise NotImplementedError(
                f"parameter of shape {tuple(p.shape)} is sharded along its columns "
                f"({p.placements}); shard rows (FSDP2's default Shard(0)) for NorMuon/Muon")
        split_dims.append((mesh_dim, placement.dim))
    local_matrices = math.prod(local.shape[:-2])
    if not split_dims:
        return MatrixLayout(local_matrices, rows, cols)
    if len(split_dims) > 1 or split_dims[0][1] != p.ndim - 2:
        raise NotImplementedError(
            f"parameter of shape {tuple(p.shape)} placed as {p.placements} splits its matrices "
            "along more than their rows; only one row-sharding mesh dim (FSDP2) is supported")
    mesh_dim, _ = split_dims[0]
    mesh = p.device_mesh
    layout = MatrixLayout(local_matrices, rows, cols, group=mesh.get_group(mesh_dim),
                          group_rank=mesh.get_local_rank(mesh_dim), group_size=mesh.size(mesh_dim))
    if local.shape[-2] != layout.row_count(layout.group_rank):
        raise NotImplementedError(
            f"parameter of shape {tuple(p.shape)}: local shard has {local.shape[-2]} rows, "
            f"torch.chunk over {layout.group_size} ranks gives {layout.row_count(layout.group_rank)}")
    return layout

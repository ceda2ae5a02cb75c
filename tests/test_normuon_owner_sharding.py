"""Owner-sharded NorMuon and Muon on 4 CPU ranks (gloo): equals one process, each matrix is made
whole on exactly one rank, and the bucket size bounds what a rank holds at once.

Parameters are DTensors laid out as FSDP2 and expert parallel lay them out: 2-D weights split
in rows over 4 ranks (uneven, one rank empty), expert stacks split over a 2 x 2 mesh (experts
over "ep", rows over "dp"), and expert stacks split by experts only (whole matrices per rank).
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusion_titan.optim import Muon, NorMuon
from fusion_titan.optim.matrix_layout import MatrixLayout

WORLD = 4
SHAPES = {
    "dense": (10, 6),       # rows 3,3,3,1 over 4 ranks
    "tiny": (3, 5),         # rows 1,1,1,0: rank 3 holds nothing
    "tall": (6, 12),
    "experts_rows": (4, 8, 6),   # (dp, ep) mesh: Shard(1) rows over dp, Shard(0) experts over ep
    "experts_whole": (4, 5, 7),  # Shard(0) experts over all 4 ranks: whole matrices here
}
STEPS = 3
# the optimizers under test, their options and the state each keeps per parameter (Muon's
# "adamw" scale needs each matrix's whole norm: a norm of a shard would show here)
OPTIMIZERS = {
    "NorMuon": (NorMuon, dict(update_scale="muon"), ("momentum_buffer", "second_moment")),
    "Muon": (Muon, dict(update_scale="adamw"), ("momentum_buffer",)),
}


def _grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _run(optimizer, meshes=None, bucket_mb=512.0):
    """STEPS steps of `optimizer` (a key of OPTIMIZERS); returns full weights and state."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    weights = _weights()
    params = {}
    for name, w in weights.items():
        if meshes is None:
            params[name] = torch.nn.Parameter(w.clone())
            continue
        flat, grid = meshes
        mesh, placements = {
            "dense": (flat, [Shard(0)]), "tiny": (flat, [Shard(0)]), "tall": (flat, [Shard(0)]),
            "experts_rows": (grid, [Shard(1), Shard(0)]),
            "experts_whole": (flat, [Shard(0)]),
        }[name]
        params[name] = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, placements))
    cls, kwargs, state_keys = OPTIMIZERS[optimizer]
    opt = cls(list(params.values()), lr=0.05, weight_decay=0.1, ns_dtype=torch.float64,
              bucket_mb=bucket_mb, **kwargs)
    for step in range(STEPS):
        for name, g in _grads(step).items():
            p = params[name]
            p.grad = (distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(p, DTensor) else g)
        opt.step()
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()  # noqa: E731
    out = {}
    for name, p in params.items():
        out[name] = full(p)
        for key in state_keys:
            out[f"{name}/{key}"] = full(opt.state[p][key])
    return out


def _worker(rank, port, out_dir, optimizer, bucket_mb):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import fusion_titan.optim.orthogonalized_momentum as shared

        flat = init_device_mesh("cpu", (WORLD,))
        grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        # Count the whole matrices this rank orthogonalizes, and the largest batch at once.
        work = {"matrices": 0, "largest": 0}
        real = shared.zeropower_via_newtonschulz5

        def counting(G, **kw):
            work["matrices"] += G.shape[0]
            work["largest"] = max(work["largest"], G.numel())
            return real(G, **kw)

        shared.zeropower_via_newtonschulz5 = counting
        out = _run(optimizer, (flat, grid), bucket_mb=bucket_mb)
        out["work"] = torch.tensor([work["matrices"], work["largest"]])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(optimizer, bucket_mb):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), tmp, optimizer, bucket_mb), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def _matrices_per_step() -> int:
    return sum(1 if len(s) == 2 else s[0] for s in SHAPES.values())


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bucket_mb", [512.0, 0.0002])  # one bucket; ~one small matrix per bucket
def test_four_ranks_equal_one_process_and_share_the_work(optimizer, bucket_mb):
    expected = _run(optimizer)
    ranks = _spawn(optimizer, bucket_mb)
    for out in ranks:
        for key, want in expected.items():
            torch.testing.assert_close(out[key], want, atol=1e-6, rtol=1e-6, msg=key)
    assert not torch.allclose(expected["dense"], _weights()["dense"])  # it trained

    # Every matrix orthogonalized once per step across all ranks (no rank repeats another's).
    # "experts_rows": each ep half (2 experts) is shared by its 2 dp ranks -> 4 whole matrices.
    done = [int(out["work"][0]) for out in ranks]
    assert sum(done) == STEPS * _matrices_per_step(), done
    assert max(done) < STEPS * _matrices_per_step()  # no rank does it all
    if bucket_mb < 1:
        # a bucket of 0.0002 MiB (~52 floats) fits one small matrix: batches stay single matrices
        largest = max(int(out["work"][1]) for out in ranks)
        assert largest <= max(s[-1] * s[-2] for s in SHAPES.values())


def _split_step_ops(copies: int) -> int:
    """Top-level ATen ops of NorMuon's third step on this rank (2 ranks): `copies` row-split
    matrices of each of two shapes, a row-split expert stack and an expert-split one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fusion_titan.bench.host_ops import top_level_aten_ops

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(3)
    layout = [((10, 6), Shard(0))] * copies + [((6, 12), Shard(0))] * copies + [
        ((2, 8, 6), Shard(1)), ((4, 5, 7), Shard(0))]
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=gen), mesh, [place]))
              for shape, place in layout]
    opt = NorMuon(params, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, p.placements,
                                       src_data_rank=None)
        opt.step()
    return top_level_aten_ops(opt.step)


def _ops_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        counts = torch.tensor([_split_step_ops(8), _split_step_ops(32)])
        torch.save(counts, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_owner_exchange_ops_do_not_grow_with_the_number_of_matrices():
    """Row-split matrices go to their owners and back with ops per bucket and shape, not per
    matrix (on a GPU each op is a launch and host time)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ops_worker, args=(_free_port(), tmp), nprocs=2, join=True)
        counts = [torch.load(os.path.join(tmp, f"rank{r}.pt")).tolist() for r in range(2)]
    for rank, (few, many) in enumerate(counts):
        assert many - few <= 2, f"rank {rank}: {few} ops for 8 matrices per shape, {many} for 32"


def test_layout_row_ranges_follow_torch_chunk():
    for rows, world in [(10, 4), (3, 4), (8, 2), (1, 3)]:
        layout = MatrixLayout(1, rows, 5, group=object(), group_rank=0, group_size=world)
        chunks = torch.arange(rows).chunk(world)
        for r in range(world):
            start, stop = layout.row_range(r)
            want = chunks[r].tolist() if r < len(chunks) else []
            assert list(range(start, stop)) == want, (rows, world, r)

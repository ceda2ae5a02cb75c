"""NorMuon does the same work per rank under FSDP 2 and under FSDP 2 x expert parallel 2.

Issue 16: on two H200s NorMuon kept 0.96x of the 1-GPU throughput with FSDP 2 but 0.76x with
EP 2. This pins what the optimizer does on each of 2 gloo ranks, on the real model as the
trainer parallelizes it (parallelize_fusion: EP via torchtitan's ExpertParallel, FSDP2 on the
dense mesh and on the size-1 expert-FSDP mesh), with real FSDP gradients from a forward and
backward: the same expert matrices whole on each rank, the same Newton-Schulz matrices and FLOPs
per rank, summing to every matrix of the model once, the same owner-exchange all-to-alls and
bytes, and no DTensor redistribution (gradients arrive placed like their parameters).
"""

from __future__ import annotations

import collections
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_normuon_owner_sharding import _free_port

WORLD = 2
DEBUG_DIMS = dict(vocab_size=512)  # the debug flavor with a small vocabulary (quick on CPU)


def _newton_schulz_flops(m: int, n: int, steps: int) -> int:
    """Per matrix: each quintic iteration on the wide orientation (s = min, l = max) is
    X X^T (2 s^2 l), A A (2 s^3) and B X (2 s^2 l)."""
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s ** 3)


def _job_config(ep: int):
    from fusion_titan.inference.loading import load_job_config

    return load_job_config("train_configs/debug_model.toml", [
        "--optimizer.name", "NorMuon", "--compile.no-enable", "--parallelism.expert_parallel_degree", str(ep)])


def _model_args(job_config):
    from torchtitan.protocols.train_spec import get_train_spec

    import fusion_titan.spec  # noqa: F401  (registers the "fusion" TrainSpec)

    args = get_train_spec("fusion").model_args[job_config.model.flavor].replace(**DEBUG_DIMS)
    args.update_from_config(job_config)
    return args


def _step_work(ep: int) -> dict:
    """One NorMuon step (the second, so state exists) on this rank: its work and traffic."""
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed.parallel_dims import ParallelDims

    import fusion_titan.optim.orthogonalized_momentum as shared
    from fusion_titan.infra.parallelize import parallelize_fusion
    from fusion_titan.model.model import FusionModel
    from fusion_titan.training.optimizer import build_optimizers

    job_config = _job_config(ep)
    args = _model_args(job_config)
    dims = ParallelDims(dp_shard=WORLD, dp_replicate=1, cp=1, tp=1, pp=1, ep=ep, etp=1,
                        world_size=WORLD)
    dims.build_mesh()
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    model = parallelize_fusion(model, dims, job_config)
    normuon = build_optimizers([model], job_config.optimizer, dims).optimizers[0].rules["normuon"]

    work = collections.Counter()
    real_ns, real_a2a = shared.zeropower_via_newtonschulz5, dist.all_to_all_single
    real_redistribute = DTensor.redistribute

    def counting_ns(G, steps=5, **kw):
        b = math.prod(G.shape[:-2])
        work["ns_matrices"] += b
        work["ns_flops"] += b * _newton_schulz_flops(G.shape[-2], G.shape[-1], steps)
        return real_ns(G, steps=steps, **kw)

    def counting_a2a(output, input, *a, **kw):
        work["all_to_all"] += 1
        work["all_to_all_bytes"] += input.numel() * input.element_size()
        return real_a2a(output, input, *a, **kw)

    def counting_redistribute(self, *a, **kw):
        work["redistribute"] += 1
        return real_redistribute(self, *a, **kw)

    tokens = torch.randint(0, args.vocab_size, (1, 33), generator=torch.Generator().manual_seed(1))
    for step in range(2):
        losses = model(tokens[:, :-1], labels=tokens[:, 1:])  # trunk and MTP loss sums
        sum(losses.values()).backward()
        if step == 1:
            shared.zeropower_via_newtonschulz5 = counting_ns
            dist.all_to_all_single = counting_a2a
            DTensor.redistribute = counting_redistribute
        try:
            normuon.step()
        finally:
            shared.zeropower_via_newtonschulz5 = real_ns
            dist.all_to_all_single = real_a2a
            DTensor.redistribute = real_redistribute
        model.zero_grad()

    whole_experts = sum(normuon._layout(p).local_matrices
                        for g in normuon.param_groups for p in g["params"]
                        if p.ndim == 3 and not normuon._layout(p).split)
    return {**work, "whole_expert_matrices": whole_experts}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from fusion_titan.infra import cpu_shim

    cpu_shim.install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        result = {ep: _step_work(ep) for ep in (1, 2)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _whole_model_work() -> tuple[int, int]:
    """(matrices, Newton-Schulz FLOPs) of one step over every NorMuon matrix of the unsharded
    model, counted from the parameter shapes."""
    from fusion_titan.model.model import FusionModel
    from fusion_titan.training.param_groups import split_params

    job_config = _job_config(1)
    with torch.device("meta"):
        model = FusionModel(_model_args(job_config))
    steps = job_config.optimizer.ns_steps
    matrices = flops = 0
    for p in split_params(model)["muon"]:
        b = math.prod(p.shape[:-2])
        matrices += b
        flops += b * _newton_schulz_flops(p.shape[-2], p.shape[-1], steps)
    return matrices, flops


@pytest.mark.slow
def test_expert_parallel_gives_each_rank_the_work_of_fsdp(monkeypatch):
    monkeypatch.setenv("FUSION_FORCE_CPU", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    matrices, flops = _whole_model_work()
    n_experts = _model_args(_job_config(1)).n_routed_experts
    for ep in (1, 2):
        # every matrix orthogonalized once per step over the ranks, none twice
        assert sum(r[ep]["ns_matrices"] for r in ranks) == matrices, ep
        assert sum(r[ep]["ns_flops"] for r in ranks) == flops, ep
        for r in ranks:
            assert r[ep]["ns_matrices"] < matrices  # shared, not repeated
            assert r[ep].get("redistribute", 0) == 0  # gradients placed like the parameters
            assert r[ep]["all_to_all"] >= 2  # the dense matrices go through their owners
    for rank, r in enumerate(ranks):
        # EP 2 and FSDP 2 both leave half of every expert stack whole on each rank...
        moe_layers = r[1]["whole_expert_matrices"] // (3 * n_experts // WORLD)
        assert moe_layers >= 1
        assert r[2]["whole_expert_matrices"] == r[1]["whole_expert_matrices"]
        # ...so each rank does the very same optimizer work and traffic with and without EP
        for key in ("ns_matrices", "ns_flops", "all_to_all", "all_to_all_bytes"):
            assert r[2][key] == r[1][key], (rank, key, r[2][key], r[1][key])

"""Dry run of a TOML's parallel plan: no GPU, no weights, one process standing in for N ranks.

    python scripts/dry_run.py [--config train_configs/fusion_7b.toml] [--world-size 8]
        [--gpu-gib 80] [-- overrides ...]

Builds the model on the meta device, starts torch's fake process group for `--world-size`
ranks (torchtitan's dry-run backend: collectives are no-ops), builds torchtitan's ParallelDims
and device mesh from `[parallelism]`, and applies our parallelize function exactly as the
trainer would (expert parallel, activation checkpointing, per-block compile wrappers, FSDP2).
Everything that would refuse the plan on 8 GPUs (a degree that does not divide the experts or
the world, TP/PP/CP) refuses it here.

Then it reads each parameter's local shard on rank 0 and reports, per GPU: parameters (fp32
master weights), gradients, optimizer state for the configured optimizer (AdamW: 2 fp32 moments;
NorMuon: one fp32 momentum for matrices + CautiousAdamW's 2 moments for the rest), the transient
buffers of one step (FSDP's bf16 all-gather of the largest unit; NorMuon's owner-exchange bucket
and its stack of whole local matrices, see fusion_titan/optim/normuon.py) and an activation estimate for the AC mode (stated below with its formula).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FUSION_FORCE_CPU", "1")

from fusion_titan.infra import cpu_shim  # noqa: E402

cpu_shim.install()

import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.distributed.parallel_dims import ParallelDims  # noqa: E402
from torchtitan.protocols.train_spec import get_train_spec  # noqa: E402

import fusion_titan.spec  # noqa: E402,F401  (registers the "fusion" TrainSpec)
from fusion_titan.infra.parallelize import parallelize_fusion  # noqa: E402
from fusion_titan.infra.plan_check import check_parallel_plan  # noqa: E402
from fusion_titan.model.flops import count_params  # noqa: E402
from fusion_titan.model.model import FusionModel  # noqa: E402
from fusion_titan.training.param_groups import split_params  # noqa: E402

GiB = 2**30


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def plain_name(name: str) -> str:
    """A parameter's name without the AC / compile wrappers' path components."""
    return name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


def activation_bytes(args, job_config, local_batch: int) -> tuple[int, str]:
    """Per-GPU activation memory of one micro-batch, estimated (bf16 activations)."""
    seq, dim, n_layers = job_config.training.seq_len, args.dim, args.n_layers + args.mtp_depth
    tokens = local_batch * seq
    mode = job_config.activation_checkpoint.mode
    # One block without AC keeps roughly: norms/residual (4 x dim), MLA projections and
    # decompressed K/V (q_lora + kv_lora + heads x (2 x 192 + 128)), attention output (dim), and
    # for MoE the top-k routed copies of the hidden state in and out plus the SwiGLU
    # intermediates (k x (2 dim + 3 moe_inter)) and the shared experts' (3 x shared width).
    # Hyper-connections widen the residual stream to hyper_streams copies of dim: a block's input
    # and output (and, under full AC, what is saved per block) grow with it.
    heads = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim) * 2 + args.n_heads * args.v_head_dim
    mla = args.q_lora_rank + args.kv_lora_rank + heads + dim
    moe = args.n_activated_experts * (2 * dim + 3 * args.moe_inter_dim) + 3 * args.n_shared_experts * args.moe_inter_dim
    stream = dim * args.residual_streams
    per_token_block = 2 * (2 * stream + 2 * dim + mla + moe)
    block = tokens * per_token_block
    if mode == "full":
        saved = tokens * stream * 2 * n_layers  # each block's input (all streams)
        return saved + block, (f"full AC: every block's bf16 input ({n_layers} x tokens x {stream} x 2 B) + "
                               f"one block recomputed ({per_token_block} B/token)")
    if mode == "none":
        return block * n_layers, f"no AC: {n_layers} blocks x {per_token_block} B/token"
    return block * n_layers // 2, "selective AC: about half of the no-AC estimate"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/fusion_7b.toml")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, for the verdict")
    ap.add_argument("overrides", nargs="*")
    opts = ap.parse_args()

    job_config = ConfigManager().parse_args(["--job.config_file", opts.config, *opts.overrides])
    spec = get_train_spec(job_config.model.name)
    args = spec.model_args[job_config.model.flavor]
    args.update_from_config(job_config)
    check_parallel_plan(job_config.parallelism, opts.world_size, args.n_routed_experts)
    dist.init_process_group("fake", rank=0, world_size=opts.world_size)
    p = job_config.parallelism
    parallel_dims = ParallelDims(
        dp_shard=p.data_parallel_shard_degree, dp_replicate=p.data_parallel_replicate_degree,
        cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree, etp=p.expert_tensor_parallel_degree,
        world_size=opts.world_size,
    )
    parallel_dims.build_mesh()
    with torch.device("meta"):
        model = FusionModel(args)
    counts = count_params(model, args)
    names = {id(t): n for n, t in model.named_parameters()}
    muon_names = {names[id(t)] for t in split_params(model)["muon"]}  # matrices NorMuon trains
    model = parallelize_fusion(model, parallel_dims, job_config)

    local = defaultdict(int)
    largest_local_stack = 0
    for name, param in model.named_parameters():
        n = local_numel(param)
        kind = "routed experts" if ".moe.experts." in name else "other"
        local[kind] += n
        if plain_name(name) in muon_names:  # NorMuon orthogonalizes these
            largest_local_stack = max(largest_local_stack, n)
    total_local = sum(local.values())
    optimizer = job_config.optimizer.name
    if optimizer in ("NorMuon", "Muon"):  # same state on matrices (NorMuon's per-row moment is tiny)
        muon_local = sum(local_numel(prm) for name, prm in model.named_parameters()
                         if plain_name(name) in muon_names)
        opt_bytes = 4 * muon_local + 8 * (total_local - muon_local)
        opt_desc = (f"{optimizer} momentum (fp32) on matrices + "
                    f"{'CautiousAdamW' if optimizer == 'NorMuon' else 'AdamW'} 2 x fp32 on the rest")
    else:
        opt_bytes = 8 * total_local
        opt_desc = f"{optimizer}: 2 x fp32 moments"

    # FSDP unit gathered in bf16 during forward/backward: the largest block, unsharded.
    unit_sizes = [sum(t.numel() for t in blk.parameters()) for blk in model.layers.values()]
    gather_bytes = 2 * max(unit_sizes) * 2  # current + prefetched unit
    # Owner exchange: send + receive buffers and the owner's whole matrices, NS and result
    # (~4 x bucket, fp32); matrices already whole here go in stacks of <= NS_BATCH_ELEMENTS.
    from fusion_titan.optim.orthogonalized_momentum import NS_BATCH_ELEMENTS

    bucket = job_config.optimizer.muon_bucket_mb * 2**20
    normuon_bytes = (4 * bucket + 3 * 4 * min(NS_BATCH_ELEMENTS, largest_local_stack)
                     if optimizer in ("NorMuon", "Muon") else 0)

    local_batch = job_config.training.local_batch_size
    act, act_desc = activation_bytes(args, job_config, local_batch)
    rows = [
        ("parameters (fp32 master)", 4 * total_local, f"{total_local / 1e9:.3f}B local of {counts.total / 1e9:.3f}B "
         f"(routed experts {local['routed experts'] / 1e9:.3f}B, rest {local['other'] / 1e9:.3f}B)"),
        ("gradients (fp32)", 4 * total_local, "reduce-scattered, same sharding"),
        ("optimizer state", opt_bytes, opt_desc),
        ("FSDP all-gather buffers (bf16)", gather_bytes, "largest block unsharded, current + prefetched"),
        ("NorMuon / Muon transient buffers", normuon_bytes, "4 x [optimizer] muon_bucket_mb (owner exchange) + 3 x fp32 stack of whole local matrices"),
        ("activations (estimate)", act, f"local batch {local_batch} x seq {job_config.training.seq_len}; {act_desc}"),
    ]
    total = sum(b for _, b, _ in rows)
    mesh = parallel_dims.world_mesh
    print(f"# dry run: {opts.config}, flavor {job_config.model.flavor}, {opts.world_size} ranks, "
          f"mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))}, EP {parallel_dims.ep}, "
          f"AC {job_config.activation_checkpoint.mode}, compile {job_config.compile.enable}")
    print(f"# model: {counts.total / 1e9:.3f}B total, {counts.active / 1e9:.3f}B active per token")
    print()
    print("| per GPU | GiB | how |")
    print("|---|---|---|")
    for what, b, how in rows:
        print(f"| {what} | {b / GiB:.2f} | {how} |")
    print(f"| **total** | **{total / GiB:.2f}** | of {opts.gpu_gib:.0f} GiB: "
          f"{'fits' if total / GiB < 0.9 * opts.gpu_gib else 'does NOT fit'} (90% rule) |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

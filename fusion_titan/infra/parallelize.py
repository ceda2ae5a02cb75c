"""TrainSpec.parallelize_fn: expert parallel, activation checkpointing, torch.compile, FSDP2.

Built on torchtitan's pieces (ExpertParallel, apply_ac, fully_shard settings) but walking our
module tree: the trunk's blocks, the MTP modules' blocks, the Engram memories (one unit each, their
tables sharded along the rows), and the tied embedding/head, which stays in the root FSDP unit so
the one [vocab, dim] table (sharded along vocab) serves both ends.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module

from torchtitan.config import TORCH_DTYPE_MAP
import torchtitan.distributed.activation_checkpoint as tt_ac
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.expert_parallel import ExpertParallel
from torchtitan.models.moe.moe import GroupedExperts
from torchtitan.tools import utils as tt_utils
from torchtitan.tools.logging import logger

from ..model.blocks import FusionBlock
from . import cpu_shim
from .fake_backend_ep import BalancedFakeExpertParallel

# Selective AC keeps these ops' outputs (recomputing them is the expensive part).
SAC_SAVE_LIST = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops.aten.max.default,
}


def refuse_unsupported(parallel_dims, job_config) -> None:
    unsupported = {
        "tensor_parallel_degree": parallel_dims.tp,
        "pipeline_parallel_degree": parallel_dims.pp,
        "context_parallel_degree": parallel_dims.cp,
    }
    enabled = {k: v for k, v in unsupported.items() if v > 1}
    if enabled:
        raise NotImplementedError(
            f"fusion_titan does not support {enabled} yet: set them to 1 under [parallelism] and "
            "scale with data_parallel_shard_degree (FSDP) and expert_parallel_degree instead."
        )


def _all_blocks(model: nn.Module) -> list[FusionBlock]:
    return [m for m in model.modules() if isinstance(m, FusionBlock)]


def apply_expert_parallel(model: nn.Module, ep_mesh, fake_backend: bool = False) -> None:
    # Under the fake backend torchtitan's count exchange returns garbage split sizes.
    style = BalancedFakeExpertParallel if fake_backend else ExpertParallel
    for block in _all_blocks(model):
        if block.moe_enabled:
            if block.moe.n_experts % ep_mesh.size():
                raise ValueError(
                    f"expert_parallel_degree {ep_mesh.size()} must divide n_routed_experts "
                    f"{block.moe.n_experts}"
                )
            parallelize_module(block.moe.experts, ep_mesh, style())


def apply_activation_checkpointing(model: nn.Module, ac_config, compile_enabled: bool,
                                   base_folder: str = "") -> None:
    """torchtitan's AC modes on every block: the trunk's MLA+MoE and GDN blocks and the MTP blocks.

    torchtitan's apply_ac only walks `model.layers`; the MTP modules' blocks are just as costly.
    selective_ac_option = "N" checkpoints every N-th block counting trunk then MTP blocks.
    """
    if ac_config.mode == "memory_budget":  # a compiler setting, not a per-block wrapper
        apply_ac(model, ac_config, model_compile_enabled=compile_enabled,
                 op_sac_save_list=SAC_SAVE_LIST, base_folder=base_folder)
        return
    # torchtitan counts blocks for "every N-th" in a module-level global: restart it per model,
    # or a second model built in the same process would get a shifted pattern.
    tt_ac._layer_sac_count = 0
    owners = [(model.layers, name, f"layers.{name}") for name in list(model.layers.keys())]
    owners += [(module, "block", f"mtp.{k}.block") for k, module in enumerate(model.mtp)]
    for owner, name, fqn in owners:
        wrapped = tt_ac._apply_ac_to_transformer_block(
            getattr(owner, name), ac_config, base_fqn=fqn, model_compile_enabled=compile_enabled,
            op_sac_save_list=SAC_SAVE_LIST,
        )
        owner.register_module(name, wrapped)
    logger.info(f"Applied {ac_config.mode} activation checkpointing to {len(owners)} blocks")


COMPILE_GRANULARITIES = ("block", "submodules")


def _block_units(model: nn.Module) -> list[nn.Module]:
    """What the forward calls per block: the block, or its activation-checkpointing wrapper."""
    return list(model.layers.values()) + [module.block for module in model.mtp]


def _unwrap(unit: nn.Module) -> nn.Module:
    return getattr(unit, "_checkpoint_wrapped_module", unit)


def block_fullgraph_blocker(block: nn.Module) -> str:
    """Why `block` cannot compile as one graph ("" = it can)."""
    if block.moe_enabled and not block.moe.experts.use_grouped_mm:
        return "the per-expert loop of the CPU path (reads the group sizes on the host)"
    if block.moe_enabled and block.moe.dispatch_mode != "static":
        return "[model] moe_dispatch = legacy (torchtitan's permutation reads the counts on the host)"
    return ""


def apply_compile(model: nn.Module, backend: str, granularity: str = "block",
                  cudagraphs: bool = False, sharded: bool = False, expert_parallel: bool = False) -> None:
    """torch.compile with static shapes (dynamic=False).

    granularity "block": each block as one compiled region, activation-checkpointing wrapper
    included (its recompute then runs inside the compiled backward), the MoE dispatch with it:
    fullgraph where nothing in the block reads device values on the host
    (`block_fullgraph_blocker`), else the same region with graph breaks. Each block's `forward`
    is compiled, not its module call: the hooks FSDP registers on the block afterwards (all-gather
    before, reshard after) run outside the compiled region, as around torchtitan's compiled-block
    wrapper, and parameter names are unchanged. With expert parallel the submodules granularity is
    used instead (its all-to-alls read their split sizes on the host: the dispatch cannot be one
    graph). "submodules": the norms, the mixer, the router and the shared / dense FFNs compiled one
    by one, the MoE dispatch and expert GEMMs eager (the behaviour before the static dispatch).

    cudagraphs: inductor's "reduce-overhead" mode (CUDA graph trees) per block, to remove the
    kernel-launch overhead; only where every block is one graph and nothing moves parameters
    between steps (no FSDP / EP), with the inductor backend.

    Static shapes: a step's shapes are fixed (ramps change them at a few stage boundaries, each a
    recompile), and FlexAttention inside a dynamic-shape graph fails in inductor's lowering
    ("'ShapeAsConstantBuffer' object has no attribute 'dtype'"), which stopped fusion_7b (sliding
    window -> flex) under compile; float8 needs static shapes too (docs/performance.md).
    """
    if granularity not in COMPILE_GRANULARITIES:
        raise ValueError(f"[compile] granularity = {granularity!r}: choose one of {COMPILE_GRANULARITIES}")
    torch._dynamo.config.capture_scalar_outputs = True
    # The MoE's load counters and aux loss are forward side effects: under a compiled checkpoint
    # they happen once, in the forward, and are not replayed by the recompute (as in eager).
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    static = dict(backend=backend, dynamic=False)
    units = _block_units(model)
    why_not_fullgraph = {unit: block_fullgraph_blocker(_unwrap(unit)) for unit in units}
    blockers = {why for why in why_not_fullgraph.values() if why}
    no_graphs = blockers | ({"FSDP / expert parallel (parameters and hooks change between steps)"}
                            if sharded else set())
    if cudagraphs and (no_graphs or backend != "inductor" or granularity != "block"):
        why = "; ".join(sorted(no_graphs)) or f"backend {backend!r}, granularity {granularity!r}"
        raise ValueError(f"[compile] cudagraphs = true cannot apply here ({why}): it needs "
                         "granularity = \"block\", the inductor backend and every block one graph "
                         "on one device. Set cudagraphs = false.")
    if granularity == "block" and expert_parallel:
        logger.info("[compile] granularity = block does not apply with expert parallel (host-read "
                    "all-to-all split sizes): compiling submodules")
        granularity = "submodules"
    if granularity == "submodules":
        for block in _all_blocks(model):
            block.attention_norm.compile(**static)
            block.ffn_norm.compile(**static)
            block.mixer.compile(**static)
            if block.moe_enabled:
                block.moe.router.compile(**static, fullgraph=True)
                if block.moe.shared_experts is not None:
                    block.moe.shared_experts.compile(**static, fullgraph=True)
            else:
                block.feed_forward.compile(**static, fullgraph=True)
        return
    mode = dict(mode="reduce-overhead") if cudagraphs else {}
    for unit in units:
        unit.forward = torch.compile(unit.forward, **static, fullgraph=not why_not_fullgraph[unit], **mode)
    logger.info(f"Compiled {len(units)} blocks whole (dynamic=False"
                + (", CUDA graphs" if cudagraphs else "") + ")"
                + (f"; with graph breaks because of {'; '.join(sorted(blockers))}" if blockers else
                   ", fullgraph"))


def apply_fsdp(model: nn.Module, parallel_dims, job_config, on_cpu: bool) -> None:
    training = job_config.training
    config = {
        "mesh": parallel_dims.get_mesh("fsdp"),
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        ),
    }
    if training.enable_cpu_offload:
        # parameters, gradients and optimizer state live on the host; pinning needs an accelerator
        config["offload_policy"] = CPUOffloadPolicy(pin_memory=not on_cpu and torch.cuda.is_available())
    reshard = job_config.parallelism.fsdp_reshard_after_forward != "never"
    edp_mesh = parallel_dims.get_optional_mesh("efsdp") if parallel_dims.ep_enabled else None

    def shard_block(unit: nn.Module) -> None:
        block = _unwrap(unit)  # under activation checkpointing
        if block.moe_enabled and edp_mesh is not None:
            experts = block.moe.experts
            # EP already splits dim 0 (experts); shard on dim 1 when dim 0 would run out.
            placement = (lambda p: Shard(1)) if edp_mesh.size() * parallel_dims.ep > experts.num_experts else None
            fully_shard(experts, **{**config, "mesh": edp_mesh}, reshard_after_forward=reshard,
                        shard_placement_fn=placement)
        fully_shard(unit, **config, reshard_after_forward=reshard)

    for layer in model.layers.values():
        shard_block(layer)
    for module in model.mtp:
        fully_shard(module, **config, reshard_after_forward=reshard)
    for engram in model.engrams.values():
        # its own unit: the n-gram table is sharded along its rows, like the vocabulary table
        fully_shard(engram, **config, reshard_after_forward=reshard)
    fully_shard(model, **config)  # root: tied embedding/head and the final norm

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # torchtitan divides by the global token count itself.
            module.set_gradient_divide_factor(1.0)
    if on_cpu:
        cpu_shim.force_sum_reduction_for_cpu(model)


def parallelize_fusion(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    refuse_unsupported(parallel_dims, job_config)
    on_cpu = tt_utils.device_type == "cpu"
    if on_cpu:
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                m.use_grouped_mm = False  # grouped GEMM is a CUDA kernel

    if parallel_dims.ep_enabled:
        apply_expert_parallel(model, parallel_dims.get_mesh("ep"),
                              fake_backend=job_config.comm.mode == "fake_backend")

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_activation_checkpointing(model, job_config.activation_checkpoint, compile_model,
                                       base_folder=job_config.job.dump_folder)
    if compile_model:
        sharded = parallel_dims.fsdp_enabled or parallel_dims.ep_enabled
        apply_compile(model, job_config.compile.backend,
                      granularity=getattr(job_config.compile, "granularity", "block"),
                      cudagraphs=getattr(job_config.compile, "cudagraphs", False),
                      sharded=sharded, expert_parallel=parallel_dims.ep_enabled)

    if parallel_dims.fsdp_enabled or parallel_dims.ep_enabled:
        apply_fsdp(model, parallel_dims, job_config, on_cpu)
        logger.info(f"Applied FSDP2 over {parallel_dims.get_mesh('fsdp').size()} ranks")
    elif parallel_dims.dp_replicate_enabled:
        raise NotImplementedError(
            "pure DDP (data_parallel_replicate_degree > 1 without sharding) is not supported: "
            "use data_parallel_shard_degree (FSDP2) instead"
        )
    return model

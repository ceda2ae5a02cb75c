"""Activation checkpointing and FSDP options of parallelize_fusion, on a tiny float32 model.

Every AC mode (full, selective per-op, selective every-2nd-block) must reproduce the loss, every
gradient and the MoE load counters of the plain model, with MLA+MoE, GDN and MTP blocks all
wrapped. FSDP: the mixed-precision dtypes and the CPU offload policy from [training] reach every
fully_shard unit (one-rank gloo group; a forward/backward runs under them).
"""

import copy
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

from torchtitan.config.job_config import ActivationCheckpoint

from fusion_titan.infra import cpu_shim
from fusion_titan.infra.parallelize import parallelize_fusion
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.moe import DeepSeekMoE
from fusion_titan.model.model import FusionModel
from tiny_models import loss_grads_and_load


def tiny_model() -> FusionModel:
    args = FLAVORS["debugmodel"].replace(
        vocab_size=256, n_layers=3, layer_schedule="2:1", max_seq_len=64, mtp_depth=1,
        gdn_backend="torch", attn_backend="sdpa",
    )
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    with torch.no_grad():  # a non-zero balancing bias, so routing depends on it
        for m in model.modules():
            if isinstance(m, DeepSeekMoE):
                m.expert_bias.copy_(torch.randn(m.n_experts) * 0.01)
    return model


def job_config(mode: str = "none", option: str = "2", **training) -> SimpleNamespace:
    return SimpleNamespace(
        activation_checkpoint=ActivationCheckpoint(mode=mode, selective_ac_option=option),
        compile=SimpleNamespace(enable=False, components=[]),
        job=SimpleNamespace(dump_folder=""),
        training=SimpleNamespace(**{"enable_cpu_offload": False, "mixed_precision_param": "float32",
                                    "mixed_precision_reduce": "float32", **training}),
        parallelism=SimpleNamespace(fsdp_reshard_after_forward="default"),
    )


def single_process_dims(**kw) -> SimpleNamespace:
    base = dict(tp=1, pp=1, cp=1, ep=1, ep_enabled=False, fsdp_enabled=False,
                dp_replicate_enabled=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def reference():
    model = tiny_model()
    return model, loss_grads_and_load(copy.deepcopy(model))


@pytest.mark.parametrize("mode,option,wrapped", [
    ("full", "2", ["layers.0", "layers.1", "layers.2", "mtp.0.block"]),
    ("selective", "op", ["layers.0", "layers.1", "layers.2", "mtp.0.block"]),
    ("selective", "2", ["layers.1", "mtp.0.block"]),  # every 2nd of the 4 blocks
])
def test_ac_mode_matches_no_ac(reference, mode, option, wrapped):
    base, (loss0, grads0, load0) = reference
    model = copy.deepcopy(base)
    parallelize_fusion(model, single_process_dims(), job_config(mode, option))
    found = sorted(n for n, m in model.named_modules() if isinstance(m, CheckpointWrapper))
    assert found == sorted(wrapped)
    loss, grads, load = loss_grads_and_load(model)
    assert torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads0[name]), name
    # the recomputed forward must not count the routed tokens a second time
    assert all(torch.equal(a[0], b[0]) for a, b in zip(load, load0))
    # state dict names are unchanged by the wrappers (checkpoints stay interchangeable)
    assert model.state_dict().keys() == base.state_dict().keys()


@pytest.fixture(scope="module")
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    yield mesh
    dist.destroy_process_group()


def test_fsdp_gets_dtypes_and_cpu_offload(one_rank_group):
    model = tiny_model()
    dims = single_process_dims(fsdp_enabled=True, get_mesh=lambda name: one_rank_group)
    config = job_config("full", enable_cpu_offload=True, mixed_precision_param="bfloat16",
                        mixed_precision_reduce="float32")
    parallelize_fusion(model, dims, config)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # 3 trunk blocks, 1 MTP module, the root (tied embedding/head + final norm)
    assert len(units) == 5
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group
        assert group.mp_policy.param_dtype == torch.bfloat16
        assert group.mp_policy.reduce_dtype == torch.float32
        assert isinstance(group.offload_policy, CPUOffloadPolicy)
    cpu_shim.force_sum_reduction_for_cpu(model)  # gloo lacks PREMUL_SUM, as in the trainer
    tokens = torch.randint(0, 256, (1, 17))
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    (out["ce_sum"] + out["mtp_sums"].sum()).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.device.type == "cpu"
        assert p.dtype == torch.float32  # sharded master weights stay fp32; compute ran in bf16

"""apply_compile's block granularity: every block (MLA+MoE, GDN, MTP) one graph, with and
without activation checkpointing, equal to the eager model; CUDA graphs refused where they cannot
apply. On the CPU the MoE takes the grouped-GEMM path (torch._grouped_mm has a CPU kernel), the
one the GPU runs; fullgraph=True turns any graph break (a host sync) into an error.
"""

import copy

import pytest
import torch

from fusion_titan.infra.parallelize import apply_compile, block_fullgraph_blocker
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.model.moe import DeepSeekMoE
from tiny_models import loss_grads_and_load
from trainer_runs import launch, tb_losses


# dynamo + autograd only: fullgraph proves no graph break (inductor on 2 CPU cores takes ~9 min;
# the aot_eager backend trips over a stride in the GDN backward that inductor handles)
BACKEND = "eager"


def tiny_model(**changes) -> FusionModel:
    args = FLAVORS["debugmodel"].replace(
        vocab_size=256, n_layers=3, layer_schedule="2:1", max_seq_len=64, mtp_depth=1,
        gdn_backend="torch", attn_backend="sdpa", moe_capacity_factor=1.0, **changes,
    )
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    for m in model.modules():
        if isinstance(m, DeepSeekMoE):
            m.experts.use_grouped_mm = True
    return model


# Without activation checkpointing: AC "full" under the eager backend trips autograd's version
# check on a MoE buffer (no functionalization there); the compiled-checkpoint path is covered per
# MoE in test_moe.py and needs the GPU (inductor) to be checked for the whole block.
def test_blocks_compile_fullgraph_and_match_eager():
    torch._dynamo.reset()
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    assert not any(block_fullgraph_blocker(b) for b in compiled.layers.values())
    apply_compile(compiled, backend=BACKEND)
    want, got = loss_grads_and_load(eager), loss_grads_and_load(compiled)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-3, atol=1e-3 * g.abs().max().item(), msg=name)
    for (a, b), (c, d) in zip(got[2], want[2]):  # load counted once, also under checkpointing
        assert torch.equal(a, c) and torch.equal(b, d)
    assert sum(d.item() for _, d in want[2]) > 0  # capacity 1.0 drops some: that path is traced too


def test_cudagraphs_refused_where_they_cannot_apply():
    with pytest.raises(ValueError, match="moe_dispatch = legacy"):
        apply_compile(tiny_model(moe_dispatch="legacy"), backend="inductor", cudagraphs=True)
    with pytest.raises(ValueError, match="FSDP"):
        apply_compile(tiny_model(), backend="inductor", cudagraphs=True, sharded=True)
    with pytest.raises(ValueError, match="granularity"):
        apply_compile(tiny_model(), backend="inductor", granularity="submodules", cudagraphs=True)
    with pytest.raises(ValueError, match="choose one of"):
        apply_compile(tiny_model(), backend="inductor", granularity="whole")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_trainer_with_cudagraphs_logs_the_losses_of_the_compiled_run(tmp_path):
    """The real trainer with CUDA graph trees per block (FusionTrainer marks each step's start)
    runs and logs the losses of the same compiled run without graphs: a replay over outputs still
    in use would fail or change them."""
    losses = {}
    for name, extra in (("plain", []), ("graphs", ["--compile.cudagraphs"])):
        dump = tmp_path / name
        launch(dump, "--training.steps", "4", "--debug.seed", "0", "--compile.enable",
               "--checkpoint.no-enable", *extra, cpu=False)
        losses[name] = tb_losses(dump)
    assert sorted(losses["graphs"]) == [1, 2, 3, 4]
    for step, want in losses["plain"].items():
        assert losses["graphs"][step] == pytest.approx(want, rel=1e-3), (step, losses)

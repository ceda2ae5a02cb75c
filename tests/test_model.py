"""Shapes, causality and the TOML switches of the whole hybrid model (CPU, small shapes)."""

import pytest
import torch

from fusion_titan.model.layer_pattern import SCHEDULE_PRESETS
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.model.moe import DeepSeekMoE


def tiny_args(**changes):
    base = FLAVORS["debugmodel"].replace(vocab_size=256, n_layers=6, max_seq_len=64)
    return base.replace(**changes)


def build(args, seed=0):
    torch.manual_seed(seed)
    model = FusionModel(args)
    model.init_weights()
    return model


EXPECTED_KINDS = {  # 6 layers of each preset, written out by hand
    "5:1": ["mla"] * 5 + ["gdn"], "6:1": ["mla"] * 6, "8:1": ["mla"] * 6,
    "mha": ["mla"] * 6, "ssm": ["gdn"] * 6,
}


@pytest.mark.parametrize("schedule", SCHEDULE_PRESETS)
def test_forward_backward_shapes(schedule):
    args = tiny_args(layer_schedule=schedule)
    model = build(args)
    kinds = [layer.kind for layer in model.layers.values()]
    assert kinds == EXPECTED_KINDS[schedule]
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, args.vocab_size)
    out = model(tokens, labels=torch.randint(0, args.vocab_size, (2, 24)))
    loss = out["ce_sum"] + out["mtp_sums"].sum()
    loss.backward()
    assert out["mtp_sums"].shape == (args.mtp_depth,)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # every block's mixer received a gradient
    for layer in model.layers.values():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.mixer.parameters())


@pytest.mark.parametrize("schedule", ["5:1", "ssm"])
def test_causal(schedule):
    """Changing token t+1 never changes the logits at positions <= t."""
    model = build(tiny_args(layer_schedule=schedule)).double()
    tokens = torch.randint(0, 256, (1, 20))
    base = model(tokens)
    for t in (0, 7, 18):
        changed = tokens.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-10)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_switches_off():
    args = tiny_args(n_routed_experts=0, mtp_depth=0, logit_softcap=0.0, mup=False)
    model = build(args)
    assert not any(isinstance(m, DeepSeekMoE) for m in model.modules())
    assert len(model.mtp) == 0 and model.logit_scale == 1.0
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens, labels=tokens)
    assert set(out) == {"ce_sum"}
    # without softcap the logits are the plain tied-head projection
    h = model.norm(model.trunk(tokens))
    torch.testing.assert_close(model(tokens), h @ model.tok_embeddings.weight.t())


def test_softcap_bounds_logits():
    args = tiny_args(logit_softcap=0.5)
    logits = build(args)(torch.randint(0, 256, (1, 8)))
    assert logits.abs().max() <= 0.5


def test_mup_init_scales_with_width():
    narrow = build(tiny_args(dim=128, mup_base_dim=128))
    wide = build(tiny_args(dim=512, mup_base_dim=128))
    w_n = narrow.layers["0"].feed_forward.w1.weight if not narrow.layers["0"].moe_enabled else narrow.layers["0"].moe.router.gate.weight
    w_w = wide.layers["0"].feed_forward.w1.weight if not wide.layers["0"].moe_enabled else wide.layers["0"].moe.router.gate.weight
    # 4x wider: muP hidden init std shrinks by sqrt(4) = 2; logits are scaled by 1/4
    ratio = w_n.std() / w_w.std()
    assert 1.8 < ratio < 2.2
    assert wide.logit_scale == pytest.approx(0.25)
    plain = build(tiny_args(dim=512, mup=False))
    assert plain.logit_scale == 1.0


def test_mtp_targets_are_shifted():
    """MTP depth 1 predicts labels[t+1]: a model whose depth-1 module sees the true next token
    can only be scored against the sequence shifted by one more position."""
    args = tiny_args(mtp_depth=2)
    model = build(args)
    tokens = torch.randint(0, 256, (2, 12))
    labels = torch.roll(tokens, -1, dims=1)
    out = model(tokens, labels=labels)
    assert out["mtp_tokens"].tolist() == [2 * 11, 2 * 10]


def test_meta_device_build_and_param_counts():
    from fusion_titan.model.flops import count_params, flops_per_token

    args = FLAVORS["fusion_7b"]
    with torch.device("meta"):
        model = FusionModel(args)
    counts = count_params(model, args)
    # seed dims: 25 MoE layers x 64 experts x 3 x 2048 x 1536 routed-expert weights
    assert counts.routed_experts == 25 * 64 * 3 * 2048 * 1536
    assert counts.active < counts.total
    assert flops_per_token(args, 4096, counts) > 6 * counts.trunk_active


def test_mamba2_blocks_replace_gdn():
    from fusion_titan.model.mixers.mamba2 import Mamba2

    model = build(tiny_args(ssm_type="mamba2", mamba_d_state=16, mamba_head_dim=32))
    mixers = [layer.mixer for layer in model.layers.values() if layer.kind == "mamba2"]
    assert mixers and all(isinstance(m, Mamba2) for m in mixers)
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens, labels=tokens)
    out["ce_sum"].backward()
    assert all(p.grad is not None for m in mixers for p in m.parameters())


def test_moe_balance_loss_reaches_the_training_output():
    model = build(tiny_args(moe_seq_aux_weight=0.01, moe_capacity_factor=1.0))
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens, labels=tokens)
    assert out["moe_aux_sum"] > 0
    out["moe_aux_sum"].backward()
    gate = model.layers["0"].moe.router.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    model.eval()
    assert "moe_aux_sum" not in model(tokens, labels=tokens)

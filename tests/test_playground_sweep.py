"""train_configs/ablations/playground_sweep.toml plans on CPU: every block kind it swaps in builds
at fusion_1b's width, the model it builds is the kind the variant names, and every run spends
the budget within half an evaluation block."""

from __future__ import annotations

from pathlib import Path

from fusion_titan.ablation.plan import budget_flops, plan_variant
from fusion_titan.ablation.sweep import load_sweep
from fusion_titan.model.layer_pattern import parse_layer_pattern

ROOT = Path(__file__).resolve().parents[1]


def test_playground_sweep_plans_every_variant():
    sweep = load_sweep(ROOT / "train_configs/ablations/playground_sweep.toml")
    sweep = sweep.__class__(**{**sweep.__dict__, "config": str(ROOT / sweep.config)})
    budget = budget_flops(sweep, ngpu=1)
    plans = {v.name: plan_variant(sweep, v, budget, 1, "") for v in sweep.variants}
    assert set(plans) == {"hybrid", "gated_attn", "csa_hybrid", "scaled_residual", "hyper", "mhc", "engram"}
    for runs in plans.values():
        assert len(runs) == 2
        p = runs[0]
        assert abs(p.flops - budget) <= p.shape.flops_per_token * p.shape.tokens_per_step * sweep.eval_points / 2
    model = {name: runs[0].resolved["model"] for name, runs in plans.items()}
    assert model["gated_attn"]["attn_gate"] == "output" and model["gated_attn"]["qk_norm"] is True
    kinds = [layer.mixer for layer in parse_layer_pattern(model["csa_hybrid"]["layer_pattern"])]
    assert kinds == ["gdn", "csa", "attn"] * 2
    assert model["mhc"]["hyper_mode"] == "mhc" and model["hyper"]["residual"] == "hyper"
    assert model["engram"]["engram_layers"] == [1]
    # the swapped-in kinds differ in FLOPs per token from the reference, so their step counts do too
    assert plans["gated_attn"][0].steps != plans["hybrid"][0].steps
    assert plans["csa_hybrid"][0].steps != plans["hybrid"][0].steps

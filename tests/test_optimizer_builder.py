"""The optimizer the trainer gets: rule assignment, per-group LRs, checkpoint round trip."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.optim import CautiousAdamW, Muon, NorMuon
from fusion_titan.optim.hybrid import HybridOptimizer
from fusion_titan.training.optimizer import FusionOptimizersContainer, _optimizer_factory


def config(name="NorMuon"):
    return SimpleNamespace(name=name, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                           implementation="fused", muon_lr=0.02, muon_momentum=0.95,
                           muon_beta2=0.95, muon_weight_decay=0.01, ns_steps=5,
                           muon_update_scale="muon", muon_bucket_mb=512.0,
                           early_step_in_backward=False)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = FusionModel(FLAVORS["debugmodel"].replace(vocab_size=128, n_layers=6))
    model.init_weights()
    return model


def train_steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(0, 128, (2, 12), generator=g)
        out = model(tokens, labels=tokens)
        (out["ce_sum"] + out["mtp_sums"].sum()).backward()
        opt.step()
        opt.zero_grad()


def test_rules_are_assigned_by_role():
    model = tiny_model()
    opt = _optimizer_factory(config())(model)
    assert isinstance(opt, HybridOptimizer)
    assert isinstance(opt.rules["normuon"], NorMuon) and isinstance(opt.rules["adamw"], CautiousAdamW)
    rule_of = {id(p): g["rule"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert rule_of[id(names["tok_embeddings.weight"])] == "adamw"
    assert rule_of[id(names["layers.0.moe.router.gate.weight"])] == "adamw"
    assert rule_of[id(names["layers.0.moe.experts.w1"])] == "normuon"
    assert rule_of[id(names["layers.0.mixer.wkv_b.weight"])] == "normuon"
    assert rule_of[id(names["layers.5.mixer.q_conv.weight"])] == "adamw"
    assert rule_of[id(names["layers.5.mixer.A_log"])] == "adamw"
    assert len(rule_of) == len(names)  # every parameter exactly once
    lr = {g["name"]: g["lr"] for g in opt.param_groups}
    wm = model.model_args.width_mult
    assert lr["normuon"] == 0.02 and lr["embedding"] == 1e-3 and lr["adam_hidden"] == 1e-3 / wm


def test_scheduler_scales_every_group():
    model = tiny_model()
    container = FusionOptimizersContainer([model], _optimizer_factory(config()), {"lr": 1e-3})
    sched = torch.optim.lr_scheduler.LambdaLR(container.optimizers[0], lambda step: 0.5)
    lr = {g["name"]: g["lr"] for g in container.optimizers[0].param_groups}
    assert lr["normuon"] == 0.01 and lr["vectors"] == 5e-4
    del sched


@pytest.mark.parametrize("name, kinds", [
    ("NorMuon", {"momentum_buffer", "second_moment", "exp_avg", "exp_avg_sq", "step"}),
    ("Muon", {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}),
])
def test_checkpoint_round_trip_continues_identically(name, kinds):
    model = tiny_model()
    opt = _optimizer_factory(config(name))(model)
    train_steps(model, opt, 3)
    # a real checkpoint is a copy on disk; the live state dict shares tensors with the optimizer
    state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert {k for per_param in state["state"].values() for k in per_param} == kinds

    clone = copy.deepcopy(model)
    clone_opt = _optimizer_factory(config(name))(clone)
    set_optimizer_state_dict(clone, clone_opt, state)
    train_steps(model, opt, 2, seed=7)
    train_steps(clone, clone_opt, 2, seed=7)
    for (n, a), (_, b) in zip(model.named_parameters(), clone.named_parameters()):
        assert torch.equal(a, b), n


def test_muon_routes_hidden_matrices_to_muon_and_the_rest_to_adamw():
    """Muon: the same split as NorMuon (hidden matrices incl. experts -> Muon; embedding/head,
    router gates, conv kernels, norms and other vectors -> torch's AdamW), its own lrs."""
    model = tiny_model()
    cfg = config("Muon")
    opt = _optimizer_factory(cfg)(model)
    assert isinstance(opt, HybridOptimizer) and set(opt.rules) == {"muon", "adamw"}
    assert type(opt.rules["muon"]) is Muon and type(opt.rules["adamw"]) is torch.optim.AdamW
    rule_of = {id(p): g["rule"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(rule_of) == len(names)  # every parameter exactly once
    for name, p in names.items():
        hidden = (p.ndim >= 2 and "tok_embeddings" not in name and "router.gate" not in name
                  and "conv" not in name)
        assert rule_of[id(p)] == ("muon" if hidden else "adamw"), name
    assert rule_of[id(names["layers.0.moe.experts.w1"])] == "muon"
    assert rule_of[id(names["norm.weight"])] == "adamw"
    assert any(p.ndim == 1 and "bias" in n for n, p in names.items() if rule_of[id(p)] == "adamw")
    lr = {g["name"]: g["lr"] for g in opt.param_groups}
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert lr["muon"] == 0.02 and lr["embedding"] == 1e-3 and lr["vectors"] == 1e-3
    assert wd["muon"] == 0.01 and wd["embedding"] == 0.0 and wd["vectors"] == 0.0
    g = opt.param_groups[[gr["name"] for gr in opt.param_groups].index("muon")]
    assert (g["momentum"], g["ns_steps"], g["update_scale"]) == (0.95, 5, "muon")
    train_steps(model, opt, 2)
    assert all(set(opt.state[p]) == {"momentum_buffer"} for g in opt.rules["muon"].param_groups
               for p in g["params"])


def test_adamw_baseline_has_the_same_groups():
    model = tiny_model()
    opt = _optimizer_factory(config("AdamW"))(model)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["name"] for g in opt.param_groups} == {"embedding", "adam_hidden", "vectors"}
    train_steps(model, opt, 1)


@pytest.mark.parametrize("implementation", ["for-loop", "foreach"])
def test_normuon_refuses_a_kernel_choice_it_cannot_honour(implementation):
    cfg = config()
    cfg.implementation = implementation
    with pytest.raises(ValueError, match=f"implementation = '{implementation}' has no effect with "
                       "name = \"NorMuon\".*--optimizer.implementation fused"):
        _optimizer_factory(cfg)
    cfg.name = "AdamW"  # AdamW honours it: torch's foreach kernels
    assert bool(_optimizer_factory(cfg)(tiny_model()).defaults["foreach"]) is (implementation == "foreach")


def test_the_documented_muon_recipe_is_what_it_says(tmp_path):
    """docs/config.md's Muon TOML: parsed by the real ConfigManager, it builds Muon + AdamW with
    the stated lrs and torchtitan's scheduler warms up over 500 steps, then decays by a cosine
    to 0; clipping at 1.0."""
    import math
    import re
    from pathlib import Path

    from torchtitan.config import ConfigManager

    from fusion_titan.training.lr_schedule import build_lr_schedulers

    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", page, re.S) if 'name = "Muon"' in b)
    toml = tmp_path / "muon.toml"
    toml.write_text('[job]\ncustom_config_module = "fusion_titan.config.job_config"\n\n' + block)
    job = ConfigManager().parse_args(["--job.config_file", str(toml)])
    assert job.training.max_norm == 1.0
    model = tiny_model()
    container = FusionOptimizersContainer([model], _optimizer_factory(job.optimizer),
                                          {"lr": job.optimizer.lr})
    opt = container.optimizers[0]
    peak = {g["name"]: g["lr"] for g in opt.param_groups}
    assert peak["muon"] == 0.02 and peak["embedding"] == 0.002 and peak["vectors"] == 0.002
    muon = next(g for g in opt.param_groups if g["name"] == "muon")
    assert (muon["momentum"], muon["ns_steps"], muon["weight_decay"]) == (0.95, 5, 0.01)

    steps = 2500
    sched = build_lr_schedulers(container, job.lr_scheduler, steps).schedulers[0]
    factors = [sched.lr_lambdas[0](s) for s in range(steps + 1)]
    assert factors[1] < 0.01 and factors[500] == 1.0  # linear warmup, 500 steps
    for s in (700, 1500, 2200):  # cosine from the end of the warmup to 0 at the last step
        want = 0.5 * (1 + math.cos(math.pi * (s - 500) / (steps + 1 - 500)))
        assert abs(factors[s] - want) < 2e-3, (s, factors[s], want)
    assert factors[steps] < 1e-5

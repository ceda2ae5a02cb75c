"""muP (Tensor Programs V; microsoft/mup's per-matrix rule, fusion_titan/model/mup.py).

1. Init: every weight's std follows its own fan-in at two widths (base and 4x): the expected
   multipliers are written out here from the model's shapes, not taken from our helper.
2. Learning rates: each Adam matrix's group has lr / its fan-in multiplier (weight decay times
   it); NorMuon matrices get the spectral-condition multiplier.
3. Coordinate check on the whole hybrid (MLA + MoE, GDN, MTP, softcap) with AdamW and with
   NorMuon: after a few steps on a fixed batch, the change of each part's output and the logits
   RMS do not drift with width; with the standard parametrization at the same lr they do.
   Measured on this CPU, widths 64 -> 256 (base 64), 4 steps: see docs/model.md "muP".
"""

import math

import pytest
import torch
from torchtitan.config import ConfigManager

import fusion_titan.spec  # noqa: F401  registers "fusion" (the optimizer config's sections)
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.training.optimizer import _optimizer_factory

BASE = 64


def hybrid_args(width: int, mup: bool = True, **changes):
    """Every part of the hybrid; the width fields grow with `width` exactly as mup_base() shrinks
    them (heads of fixed size, FFN / expert widths proportional), the LoRA ranks are fixed."""
    return FLAVORS["debugmodel"].replace(**{
        "vocab_size": 256, "n_layers": 2, "layer_schedule": "1:1", "dim": width, "mup": mup,
        "mup_base_dim": BASE, "n_heads": width // 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "q_lora_rank": 32, "kv_lora_rank": 32,
        "n_routed_experts": 8, "n_activated_experts": 2, "n_shared_experts": 1,
        "n_expert_groups": 4, "n_limited_groups": 2, "moe_inter_dim": width // 2,
        "ffn_hidden_dim": 2 * width, "gdn_n_heads": width // 32, "gdn_head_k_dim": 16,
        "gdn_head_v_dim": 32, "mtp_depth": 1, "logit_softcap": 15.0, "max_seq_len": 64,
        "moe_bias_update_rate": 0.0, **changes})


def optimizer_config(name: str, lr: float = 1e-2, muon_lr: float = 0.02, weight_decay: float = 0.0,
                     update_scale: str = "muon"):
    return ConfigManager().parse_args([
        "--job.config_file", "train_configs/debug_model.toml", "--optimizer.name", name,
        "--optimizer.lr", str(lr), "--optimizer.muon_lr", str(muon_lr),
        "--optimizer.weight_decay", str(weight_decay), "--optimizer.muon_weight_decay",
        str(weight_decay), "--optimizer.muon_update_scale", update_scale,
        # AdamW's plain for-loop kernels for the comparisons; NorMuon has one implementation
        *(["--optimizer.implementation", "for-loop"] if name != "NorMuon" else [])]).optimizer


# ----------------------------------------------------------------------------------------------
# the rule, written out per weight

RESIDUAL_OUTPUTS = ("wo", "o_proj", "out_proj", "w2")  # std / sqrt(2 n_layers) in the base model
FIXED_FAN_IN = ("wq_b", "wkv_b", "q_conv", "k_conv", "v_conv", "conv", "tok_embeddings")
TRUNC3 = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))


def leaf(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]


def expected_std(name: str, args) -> float:
    """muP: base std / sqrt(fan-in multiplier); every fan-in in these models grows with the width
    (dim, heads x v_head_dim, FFN and expert widths, 2 dim, Mamba's 2 dim) except the LoRA ranks,
    the conv kernels and the vocabulary."""
    if name == "tok_embeddings.weight":
        return args.init_std  # plain normal, fan-in = vocabulary
    if leaf(name) in ("q_conv", "k_conv", "v_conv", "conv"):
        return 1 / math.sqrt(3 * args.gdn_conv_size)  # nn.Conv1d's uniform(+-1/sqrt(fan_in))
    std = args.init_std / (math.sqrt(2 * args.n_layers) if leaf(name) in RESIDUAL_OUTPUTS else 1)
    mult = 1.0 if leaf(name) in FIXED_FAN_IN else args.dim / BASE
    return std * TRUNC3 / math.sqrt(mult)


@pytest.mark.parametrize("changes", [{}, {"ssm_type": "mamba2", "q_lora_rank": 0}])
@pytest.mark.parametrize("width", [BASE, 4 * BASE])
def test_init_std_follows_each_fan_in(width, changes):
    args = hybrid_args(width, **changes)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    checked = 0
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        want = expected_std(name, args)
        tolerance = 0.02 + 4 / math.sqrt(2 * p.numel())  # 4 standard errors of a sample std
        assert p.std().item() == pytest.approx(want, rel=tolerance), (name, tuple(p.shape))
        checked += 1
    kinds = {leaf(n) for n, p in model.named_parameters() if p.ndim >= 2}
    assert checked == sum(p.ndim >= 2 for p in model.parameters()) and len(kinds) >= 12, kinds


def test_mup_off_is_the_standard_init():
    wide = FusionModel(hybrid_args(4 * BASE, mup=False))
    wide.init_weights()
    assert wide.layers["1"].mixer.q_proj.weight.std().item() == pytest.approx(0.02 * TRUNC3, rel=0.05)
    assert wide.logit_scale == 1.0


# ----------------------------------------------------------------------------------------------
# learning rates

def group_of(model, opt) -> dict[str, dict]:
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_adam_lr_and_decay_follow_each_fan_in():
    args = hybrid_args(4 * BASE)
    model = FusionModel(args)
    cfg = optimizer_config("AdamW", lr=1e-3, weight_decay=0.1)
    groups = group_of(model, _optimizer_factory(cfg)(model))
    for name, p in model.named_parameters():
        if p.ndim < 2 or name == "tok_embeddings.weight":
            assert (groups[name]["lr"], groups[name]["weight_decay"]) == (1e-3, 0.0), name
            continue
        mult = 1.0 if leaf(name) in FIXED_FAN_IN else 4.0
        assert groups[name]["lr"] == pytest.approx(1e-3 / mult), name
        assert groups[name]["weight_decay"] == pytest.approx(0.1 * mult), name


@pytest.mark.parametrize("optimizer", ["NorMuon", "Muon"])
@pytest.mark.parametrize("update_scale", ["muon", "adamw"])
def test_normuon_lr_follows_the_spectral_condition(update_scale, optimizer):
    """The update's spectral norm must scale as sqrt(out / in) (Yang, Simon & Bernstein 2023).
    Per unit lr NorMuon and Muon give sqrt(max(1, out/in)) ("muon") or sqrt(max(out, in))
    ("adamw")."""
    model = FusionModel(hybrid_args(4 * BASE))
    base = dict(FusionModel(hybrid_args(BASE)).named_parameters())
    groups = group_of(model, _optimizer_factory(optimizer_config(optimizer, update_scale=update_scale))(model))
    wanted_over_given = {
        "muon": lambda o, i: math.sqrt(o / i) / math.sqrt(max(1, o / i)),
        "adamw": lambda o, i: math.sqrt(o / i) / math.sqrt(max(o, i)),
    }[update_scale]
    seen = 0
    for name, p in model.named_parameters():
        if groups[name]["rule"] != optimizer.lower():
            continue
        expected = 0.02 * wanted_over_given(*p.shape[-2:]) / wanted_over_given(*base[name].shape[-2:])
        assert groups[name]["lr"] == pytest.approx(expected), name
        seen += 1
    assert seen > 10
    if update_scale == "muon":  # only the fixed-rank bottleneck inputs need less than the base lr
        assert groups["layers.0.mixer.wq_a.weight"]["lr"] == pytest.approx(0.02 / 2)
        assert groups["layers.0.mixer.wo.weight"]["lr"] == pytest.approx(0.02)


# ----------------------------------------------------------------------------------------------
# coordinate check

WIDTHS = (BASE, 2 * BASE, 4 * BASE)
STEPS = 4


def coordinates(width: int, mup: bool, cfg, **changes) -> dict[str, float]:
    """RMS of the change of each part's output (same fixed batch, before vs after STEPS updates)
    and the RMS of the final logits. `changes` edit hybrid_args (layer "0" stays attention-type)."""
    torch.manual_seed(0)
    model = FusionModel(hybrid_args(width, mup, **changes))
    model.init_weights()
    opt = _optimizer_factory(cfg)(model)
    data = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:]
    parts = {"mla": model.layers["0"].mixer, "moe": model.layers["0"].moe,
             "gdn": model.layers["1"].mixer, "mtp": model.mtp[0]}

    def outputs():
        got = {}
        hooks = [module.register_forward_hook(
            lambda m, i, out, key=key: got.__setitem__(key, out[0] if isinstance(out, tuple) else out))
            for key, module in parts.items()]
        with torch.no_grad():
            model(x, labels=y)
            got["logits"] = model(x)
        for hook in hooks:
            hook.remove()
        return got

    before = outputs()
    for _ in range(STEPS):
        out = model(x, labels=y)
        ((out["ce_sum"] + out["mtp_sums"].sum()) / y.numel()).backward()
        opt.step()
        opt.zero_grad()
    after = outputs()
    coords = {key: (after[key] - before[key]).pow(2).mean().sqrt().item() for key in parts}
    coords["logits"] = after["logits"].pow(2).mean().sqrt().item()
    return coords


def spreads(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in runs) / min(r[k] for r in runs) for k in runs[0]}


@pytest.fixture(scope="module", params=["AdamW", "NorMuon"])
def coords(request):
    cfg = optimizer_config(request.param)
    return {mup: [coordinates(w, mup, cfg) for w in (WIDTHS if mup else WIDTHS[::2])]
            for mup in (True, False)}


def test_mup_coordinates_stay_flat_across_width(coords):
    spread = spreads(coords[True])
    assert max(spread.values()) < 1.7, (spread, coords[True])


def test_standard_parametrization_drifts(coords):
    """The check can fail: without muP the same runs drift with width."""
    spread = spreads(coords[False])
    assert max(spread.values()) > 2.5, (spread, coords[False])

"""Softmax top-k router, Switch / GShard balance losses, router z-loss: against hand formulas.

Every reference here is written out token by token (Python floats, explicit loops), independent
of the code under test; the MoE-level tests check that the router composes with capacity
dropping, the load metrics, the bias-update rule and the model's `moe_aux_sum` path.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion_titan.model.args import FusionModelArgs
from fusion_titan.model.balance_losses import gshard_balance_loss, router_z_loss, switch_balance_loss
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.model.moe import DeepSeekMoE, load_metrics
from fusion_titan.model.routers import ROUTERS, GroupLimitedRouter, SoftmaxTopKRouter, top_k
from fusion_titan.training.moe_balance import ExpertBiasUpdater
from fusion_titan.training.tb_scalars import read_all_scalars
from trainer_runs import run_train, tb_losses

D = torch.float64


def make_softmax_moe(dim=10, n_experts=6, top_k=2, n_shared=1, inter_dim=5, seed=0, std=0.3, **kwargs):
    torch.manual_seed(seed)
    moe = DeepSeekMoE(dim, n_experts, top_k, n_shared, inter_dim, n_groups=3, n_limited_groups=1,
                      route_scale=2.5, bias_update_rate=0.01, use_grouped_mm=False,
                      router="softmax_topk", **kwargs)
    moe.init_weights(std, std / 2)
    return moe.to(D)


def hand_softmax_route(x_t, gate_w, top_k, normalize):
    """One token: explicit dot products, softmax and a sorted top-k. Returns ({expert: weight}, probs)."""
    logits = [sum(a * b for a, b in zip(row, x_t)) for row in gate_w]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    probs = [e / sum(exps) for e in exps]
    chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:top_k]
    total = sum(probs[e] for e in chosen) if normalize else 1.0
    return {e: probs[e] / total for e in chosen}, probs


# ---------------------------------------------------------------------------------------------
# The router


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, False), (2, True), (3, True)])
def test_softmax_router_matches_token_by_token_reference(top_k, normalize):
    torch.manual_seed(top_k)
    r = SoftmaxTopKRouter(7, 5, top_k, normalize_topk=normalize).to(D)
    x = torch.randn(40, 7, dtype=D)
    w, idx, probs, logits = r(x, return_logits=True)
    gate_w = r.gate.weight.tolist()
    for t in range(40):
        want, want_probs = hand_softmax_route(x[t].tolist(), gate_w, top_k, normalize)
        got = dict(zip(idx[t].tolist(), w[t].tolist()))
        assert got == pytest.approx(want, rel=1e-12)
        assert probs[t].tolist() == pytest.approx(want_probs, rel=1e-12)
        assert idx[t, 0].item() == max(range(5), key=lambda e: want_probs[e])  # first choice first
    torch.testing.assert_close(logits, x @ r.gate.weight.T)
    # Switch top-1 keeps the raw probability: the gate gets a gradient through the weight itself
    if top_k == 1:
        (g,) = torch.autograd.grad(w.sum(), r.gate.weight)
        assert g.abs().sum() > 0


def test_softmax_router_rejects_a_bias_and_bad_settings():
    r = SoftmaxTopKRouter(4, 4, 2)
    with pytest.raises(ValueError, match="no expert bias"):
        r(torch.randn(3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="top_k"):
        SoftmaxTopKRouter(4, 4, 5)
    with pytest.raises(ValueError, match="moe_router_jitter"):
        SoftmaxTopKRouter(4, 4, 2, jitter=1.0)
    assert set(ROUTERS) == {"deepseek", "softmax_topk"}
    assert ROUTERS["deepseek"] is GroupLimitedRouter and ROUTERS["softmax_topk"] is SoftmaxTopKRouter


def test_jitter_only_in_training_and_only_when_set():
    torch.manual_seed(0)
    noisy = SoftmaxTopKRouter(8, 6, 2, jitter=0.1).to(D)
    plain = SoftmaxTopKRouter(8, 6, 2).to(D)
    plain.load_state_dict(noisy.state_dict())
    x = torch.randn(64, 8, dtype=D)
    clean = x @ noisy.gate.weight.T
    # eval: no noise, and the global RNG is not drawn from
    noisy.eval()
    state = torch.get_rng_state()
    torch.testing.assert_close(noisy(x, return_logits=True)[3], clean, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)
    # training without jitter: no noise, no draw either
    plain.train()
    torch.testing.assert_close(plain(x, return_logits=True)[3], clean, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)
    # training with jitter: logits of x * u with u ~ U[0.9, 1.1] elementwise, drawn from the seed
    noisy.train()
    torch.manual_seed(5)
    got = noisy(x, return_logits=True)[3]
    torch.manual_seed(5)
    u = torch.empty(64, 8, dtype=D).uniform_(0.9, 1.1)
    assert 0.9 <= u.min() and u.max() <= 1.1 and u.std() > 0.03
    torch.testing.assert_close(got, (x * u) @ noisy.gate.weight.T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, clean)
    # the routing itself changes for some tokens (the probabilities all do)
    torch.manual_seed(5)
    _, idx_noisy, _ = noisy(x)
    _, idx_clean, _ = plain.eval()(x)
    assert (idx_noisy != idx_clean).any()


def test_deterministic_given_the_seed():
    x = torch.randn(2, 9, 10, dtype=D, generator=torch.Generator().manual_seed(0))

    def run(seed):
        moe = make_softmax_moe(router_jitter=0.2, aux_loss="switch", aux_loss_weight=0.1,
                               z_loss_weight=0.01, capacity_factor=1.0).train()
        torch.manual_seed(seed)  # the jitter noise is drawn from the global RNG
        out = moe(x)
        return out, moe.aux_loss.detach(), moe.tokens_per_expert.clone()

    a, b, c = run(1), run(1), run(2)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_softmax_router_compiles_fullgraph_with_jitter():
    torch.manual_seed(0)
    r = SoftmaxTopKRouter(16, 8, 2, jitter=0.05, normalize_topk=True).to(torch.bfloat16).train()
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    compiled = torch.compile(r, backend="aot_eager", fullgraph=True)
    w, idx, probs, logits = compiled(x, return_logits=True)
    assert w.dtype == probs.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    r.eval()
    cw, cidx, _ = compiled(x)
    w, idx, _ = r(x)
    torch.testing.assert_close(cw, w)
    assert torch.equal(cidx, idx)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_top_k_picks_the_largest_first_and_breaks_ties_to_the_lower_index(k):
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(50, 32, generator=g)
    values, indices = top_k(distinct, k)
    ref_values, ref_indices = torch.topk(distinct, k, dim=-1)  # distinct values: one answer
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    tied = torch.randint(0, 4, (50, 8), generator=g).float()  # many ties
    values, indices = top_k(tied, k)
    for row, got in zip(tied.tolist(), indices.tolist()):
        assert got == sorted(range(8), key=lambda i: (-row[i], i))[:k]
    assert torch.equal(values, tied.gather(1, indices))


def test_top_k_passes_gradients_to_the_chosen_entries_only():
    x = torch.randn(4, 8, dtype=D, requires_grad=True)
    values, indices = top_k(x, 3)
    (values * torch.arange(1.0, 4.0, dtype=D)).sum().backward()
    expected = torch.zeros(4, 8, dtype=D).scatter(1, indices, torch.arange(1.0, 4.0, dtype=D).expand(4, 3))
    assert torch.equal(x.grad, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_deepseek_router_sorts_in_triton_without_a_topk_call():
    """The reason top_k sorts: inductor fuses it into the router's Triton kernels (no aten topk)."""
    from torch._inductor.utils import run_and_get_code

    r = GroupLimitedRouter(64, 32, 6, 8, 3, route_scale=2.5).cuda()
    x = torch.randn(4096, 64, device="cuda")
    bias = torch.randn(32, device="cuda") * 0.01
    compiled = torch.compile(r, fullgraph=True, dynamic=False)
    (w, idx, _), codes = run_and_get_code(compiled, x, bias)
    # the generated code's statements (its comments name the ATen ops each kernel fuses)
    calls = [line for code in codes for line in code.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in calls if "aten.topk" in line or "aten.sort" in line]  # no fallbacks
    assert any("sort" in line and ".run(" in line for line in calls)  # a Triton kernel sorts
    ref_w, ref_idx, _ = r(x, bias)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)


# ---------------------------------------------------------------------------------------------
# The losses, each against its formula written out


def _random_routing(n_tokens, n_experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n_tokens, n_experts, generator=g, dtype=D) * 2, -1)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    return probs, idx


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_loss_is_n_times_sum_of_load_fraction_times_mean_prob(top_k):
    N, E = 13, 5
    probs, idx = _random_routing(N, E, top_k, seed=top_k)
    p, chosen = probs.tolist(), idx.tolist()
    want = 0.0
    for i in range(E):
        f_i = sum(1 for t in range(N) for j in range(top_k) if chosen[t][j] == i) / (N * top_k)
        p_i = sum(p[t][i] for t in range(N)) / N
        want += f_i * p_i
    want *= E
    assert switch_balance_loss(probs, idx).item() == pytest.approx(want, rel=1e-12)
    # balanced routing with uniform probabilities: exactly 1
    uniform = torch.full((E * 2, E), 1.0 / E, dtype=D)
    balanced = torch.stack([(torch.arange(top_k) + t) % E for t in range(E * 2)])
    assert switch_balance_loss(uniform, balanced).item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gshard_loss_counts_first_choices_only(top_k):
    N, E = 11, 4
    probs, idx = _random_routing(N, E, top_k, seed=10 + top_k)
    p, chosen = probs.tolist(), idx.tolist()
    # GShard Algorithm 1: l_aux = mean_e (c_e / S) * m_e, times E^2
    want = 0.0
    for e in range(E):
        c_e = sum(1 for t in range(N) if chosen[t][0] == e)
        m_e = sum(p[t][e] for t in range(N)) / N
        want += (c_e / N) * m_e / E
    want *= E * E
    assert gshard_balance_loss(probs, idx).item() == pytest.approx(want, rel=1e-12)
    if top_k == 1:
        assert gshard_balance_loss(probs, idx).item() == pytest.approx(switch_balance_loss(probs, idx).item())
    # second choices do not count: changing them leaves the loss unchanged
    if top_k == 2:
        other = idx.clone()
        other[:, 1] = (idx[:, 0] + 1) % E
        assert gshard_balance_loss(probs, other).item() == pytest.approx(want, rel=1e-12)


def test_router_z_loss_is_mean_squared_logsumexp():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(17, 6, generator=g, dtype=D) * 3
    rows = logits.tolist()
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-12)
    # bf16 logits are summed in fp32
    assert router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Inside the MoE layer


def test_moe_aux_loss_is_the_weighted_sum_of_the_enabled_losses():
    bsz, seqlen = 3, 5
    moe = make_softmax_moe(aux_loss="gshard", aux_loss_weight=0.3, z_loss_weight=0.02,
                           seq_aux_loss_weight=0.1).train()
    x = torch.randn(bsz, seqlen, moe.dim, dtype=D)
    moe(x)
    E, K = moe.n_experts, moe.top_k
    gate_w = moe.router.gate.weight.tolist()
    tokens = x.reshape(-1, moe.dim).tolist()
    routes = [hand_softmax_route(tok, gate_w, K, False) for tok in tokens]
    probs = [pr for _, pr in routes]
    firsts = [max(range(E), key=lambda e: pr[e]) for pr in probs]
    chosen = [list(w) for w, _ in routes]
    N = bsz * seqlen
    gshard = E * sum(sum(firsts[t] == e for t in range(N)) / N * sum(probs[t][e] for t in range(N)) / N
                     for e in range(E))
    lse = [math.log(sum(math.exp(sum(a * b for a, b in zip(row, tok))) for row in gate_w)) for tok in tokens]
    z = sum(v * v for v in lse) / N
    seq = 0.0
    for b in range(bsz):
        ts = range(b * seqlen, (b + 1) * seqlen)
        f = [E / (K * seqlen) * sum(e in chosen[t] for t in ts) for e in range(E)]
        p = [sum(probs[t][e] for t in ts) / seqlen for e in range(E)]
        seq += sum(fi * pi for fi, pi in zip(f, p)) / bsz
    want = 0.3 * gshard + 0.02 * z + 0.1 * seq
    assert moe.aux_loss.item() == pytest.approx(want, rel=1e-10)
    (g,) = torch.autograd.grad(moe.aux_loss, moe.router.gate.weight)
    assert g.abs().sum() > 0
    # eval: no aux loss; aux_loss = "none" turns the batch balance loss off whatever its weight
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert moe.aux_loss.item() == 0.0
    off = make_softmax_moe(aux_loss="none", aux_loss_weight=0.3).train()
    off(x)
    assert not off.has_aux_loss and off.aux_loss.item() == 0.0


def _expert_ffn(moe, e, x):
    w1, w2, w3 = moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e]
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def test_capacity_dropping_composes_with_the_softmax_router():
    """Top-1 Switch routing with capacity 0.5: output, dropped counts and the dropped fraction."""
    moe = make_softmax_moe(top_k=1, n_experts=4, capacity_factor=0.5).train()
    with torch.no_grad():
        moe.router.gate.weight[0] += 0.6  # expert 0 is popular
    bsz, seqlen = 2, 8
    x = torch.randn(bsz, seqlen, moe.dim, dtype=D)
    out = moe(x)
    n_tokens = bsz * seqlen
    capacity = math.ceil(0.5 * n_tokens * 1 / 4)
    tokens = x.reshape(-1, moe.dim)
    routes = [hand_softmax_route(t.tolist(), moe.router.gate.weight.tolist(), 1, False)[0] for t in tokens]
    kept = {}
    for e in range(4):
        takers = sorted((t for t in range(n_tokens) if e in routes[t]), key=lambda t: (-routes[t][e], t))
        kept.update({t: e for t in takers[:capacity]})
    n_dropped = n_tokens - len(kept)
    assert n_dropped > 0  # the test exercises dropping
    assert moe.dropped_tokens.item() == n_dropped
    want_load = [sum(e in routes[t] for t in range(n_tokens)) for e in range(4)]
    assert moe.tokens_per_expert.tolist() == want_load  # counted before dropping
    for t in range(n_tokens):
        y = moe.shared_experts(tokens[t])
        if t in kept:
            y = y + routes[t][kept[t]] * _expert_ffn(moe, kept[t], tokens[t])
        torch.testing.assert_close(out.reshape(-1, moe.dim)[t], y, rtol=1e-10, atol=1e-12)
    m = load_metrics(moe.tokens_per_expert, moe.dropped_tokens)
    assert m["moe/dropped_fraction"] == pytest.approx(n_dropped / n_tokens)
    mean = n_tokens / 4
    assert m["moe/max_over_mean_load"] == pytest.approx(max(want_load) / mean)
    assert m["moe/dead_expert_fraction"] == pytest.approx(sum(v == 0 for v in want_load) / 4)


def test_bias_update_skips_the_softmax_router_but_load_is_counted():
    moe = make_softmax_moe().train()
    deepseek = DeepSeekMoE(10, 6, 2, 1, 5, 3, 1, 1.0, 0.01, use_grouped_mm=False)
    deepseek.init_weights(0.3, 0.15)
    deepseek = deepseek.to(D).train()
    updater = ExpertBiasUpdater([torch.nn.ModuleList([moe, deepseek])])
    x = torch.randn(2, 12, 10, dtype=D)
    moe(x)
    deepseek(x)
    updater()
    assert torch.equal(moe.expert_bias, torch.zeros(6, dtype=D))  # no bias rule for softmax_topk
    assert deepseek.expert_bias.abs().sum() > 0  # the deepseek layer still balances by bias
    assert updater.last_load[0].sum().item() == 2 * 12 * 2  # the softmax layer's load was counted
    metrics = updater.metrics()
    assert 0 < metrics["moe/routing_entropy"] <= 1 and metrics["moe/max_over_mean_load"] >= 1


# ---------------------------------------------------------------------------------------------
# Configuration and the model's loss path


def test_config_errors_name_the_fix():
    args = FLAVORS["debugmodel"]
    for change, match in ((dict(moe_router="switch"), "moe_router 'switch' is not known"),
                          (dict(moe_aux_loss="lbl"), "moe_aux_loss 'lbl' is not known"),
                          (dict(moe_router_jitter=1.5), "moe_router_jitter must be in"),
                          (dict(moe_router_z_loss_weight=-1.0), "moe_router_z_loss_weight must be >= 0")):
        with pytest.raises(ValueError, match=match):
            args.replace(**change).validate()
    assert not FusionModelArgs().moe_has_aux_loss  # the defaults add no aux loss


def test_model_adds_the_router_losses_to_its_training_output():
    args = FLAVORS["debugmodel"].replace(vocab_size=256, n_layers=3, max_seq_len=32,
                                         moe_router="softmax_topk", moe_aux_loss="switch",
                                         moe_router_z_loss_weight=1e-3)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    tokens = torch.randint(0, 256, (2, 16))
    labels = tokens.clone()
    labels[0, :4] = -100  # ignored positions do not count
    out = model(tokens, labels=labels)
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    assert layers and all(isinstance(m.router, SoftmaxTopKRouter) for m in layers)
    want = sum(m.aux_loss for m in layers) * (labels != -100).sum()
    torch.testing.assert_close(out["moe_aux_sum"], want)
    assert out["moe_aux_sum"].item() > 0
    out["moe_aux_sum"].backward()
    assert layers[0].router.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert "moe_aux_sum" not in model(tokens, labels=labels)


@pytest.mark.slow
def test_trainer_trains_with_the_softmax_router(tmp_path: Path):
    steps = 20
    log = run_train(tmp_path, "--training.steps", str(steps), "--model.moe_router", "softmax_topk",
                    "--model.moe_aux_loss", "switch", "--model.moe_router_jitter", "0.01",
                    "--model.moe_capacity_factor", "1.25")
    losses = tb_losses(tmp_path)
    assert sorted(losses) == list(range(1, steps + 1)), log[-3000:]
    early = sum(losses[s] for s in range(1, 4)) / 3
    late = sum(losses[s] for s in range(steps - 2, steps + 1)) / 3
    assert late < early - 1.0, (early, late)
    tb = read_all_scalars(tmp_path)
    balance = tb["loss_metrics/moe_balance"]
    assert sorted(balance) == list(range(1, steps + 1))
    # Switch loss weight 0.01 over 5 MoE layers, each loss >= ~1 (1 = balanced)
    assert all(0.04 < v < 0.5 for v in balance.values()), balance
    for tag in ("moe/max_over_mean_load", "moe/routing_entropy", "moe/dropped_fraction"):
        assert sorted(tb[tag]) == list(range(1, steps + 1)), tag

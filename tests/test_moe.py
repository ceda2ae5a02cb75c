"""DeepSeekMoE: routing, forward/backward vs a token-by-token reference, balancing, capacity."""

import math

import pytest
import torch

from fusion_titan.model import moe_dispatch
from fusion_titan.model.moe import (
    DeepSeekMoE,
    GroupLimitedRouter,
    capacity_dispatch,
    load_metrics,
    moe_load_counters,
    reference_moe_forward,
    sequence_balance_loss,
)
from fusion_titan.training.moe_balance import ExpertBiasUpdater


def make_moe(dim=12, n_experts=8, top_k=2, n_shared=1, inter_dim=6, n_groups=4, n_limited_groups=2,
             route_scale=1.0, bias_update_rate=0.01, dtype=torch.float64, seed=0, std=0.3, **kwargs):
    torch.manual_seed(seed)
    moe = DeepSeekMoE(dim, n_experts, top_k, n_shared, inter_dim, n_groups, n_limited_groups,
                      route_scale, bias_update_rate, use_grouped_mm=False, **kwargs)
    moe.init_weights(std, std / 2)
    return moe.to(dtype)


def hand_route(scores, bias, n_groups, n_limited_groups, top_k, route_scale):
    """One token: Python lists only. Returns {expert: weight}."""
    n_experts = len(scores)
    n_groups = n_groups if n_groups > 1 else 1
    n_limited_groups = n_limited_groups if n_groups > 1 else 1
    size = n_experts // n_groups
    c = [s + b for s, b in zip(scores, bias)]
    gscore = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_groups)]
    groups = sorted(range(n_groups), key=lambda g: -gscore[g])[:n_limited_groups]
    cand = [e for e in range(n_experts) if e // size in groups]
    chosen = sorted(cand, key=lambda e: -c[e])[:top_k]
    total = sum(scores[e] for e in chosen)
    return {e: scores[e] / total * route_scale for e in chosen}


def as_dict(weights, indices):
    return {int(e): float(w) for e, w in zip(indices.tolist(), weights.tolist())}


def router_with_scores(target, n_groups, n_limited_groups, top_k, route_scale=1.0):
    """A router whose affinities for input `logit(target)` are exactly `target`."""
    n = len(target)
    r = GroupLimitedRouter(n, n, top_k, n_groups, n_limited_groups, route_scale).double()
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(n, dtype=torch.float64))
    t = torch.tensor(target, dtype=torch.float64)
    return r, torch.log(t / (1 - t)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Routing


def test_group_limit_picks_the_right_groups():
    # groups of 2; group scores (top-2 sums) 1.0, 1.15, 0.85, 0.5 -> keep groups 1 and 0
    target = [0.9, 0.1, 0.6, 0.55, 0.8, 0.05, 0.3, 0.2]
    r, x = router_with_scores(target, n_groups=4, n_limited_groups=2, top_k=2, route_scale=2.5)
    w, idx, s = r(x)
    torch.testing.assert_close(s[0], torch.tensor(target, dtype=torch.float64))
    got = as_dict(w[0], idx[0])
    # expert 4 (0.8) is the second best overall but lives in a dropped group
    assert set(got) == {0, 2}
    assert got[0] == pytest.approx(0.9 / 1.5 * 2.5) and got[2] == pytest.approx(0.6 / 1.5 * 2.5)
    # without group limiting expert 4 wins
    r_flat, _ = router_with_scores(target, n_groups=0, n_limited_groups=0, top_k=2)
    w_flat, idx_flat, _ = r_flat(x)
    assert set(as_dict(w_flat[0], idx_flat[0])) == {0, 4}


def test_bias_changes_selection_not_weights():
    target = [0.9, 0.1, 0.6, 0.55, 0.8, 0.05, 0.3, 0.2]
    r, x = router_with_scores(target, n_groups=4, n_limited_groups=2, top_k=2)
    bias = torch.zeros(8, dtype=torch.float64)
    bias[6] = 0.6  # group 3 -> 0.9 + 0.2 = 1.1 beats group 0 (1.0); expert 6 becomes the best
    w, idx, _ = r(x, bias)
    got = as_dict(w[0], idx[0])
    assert set(got) == {6, 2}
    # weights are the *unbiased* affinities 0.3 and 0.6, normalized
    assert got[6] == pytest.approx(0.3 / 0.9) and got[2] == pytest.approx(0.6 / 0.9)
    assert got == pytest.approx(hand_route(target, bias.tolist(), 4, 2, 2, 1.0))


@pytest.mark.parametrize("n_experts,n_groups,n_limited,top_k", [
    (8, 4, 2, 2), (16, 4, 1, 3), (12, 3, 2, 4), (8, 0, 0, 3), (6, 6, 3, 2), (8, 4, 4, 2)])
def test_router_matches_hand_reference(n_experts, n_groups, n_limited, top_k):
    torch.manual_seed(n_experts * 100 + top_k)
    dim = 10
    r = GroupLimitedRouter(dim, n_experts, top_k, n_groups, n_limited, route_scale=1.7).double()
    x = torch.randn(64, dim, dtype=torch.float64)
    bias = 0.2 * torch.randn(n_experts, dtype=torch.float64)
    for b in (None, bias):
        w, idx, s = r(x, b)
        torch.testing.assert_close(s, torch.sigmoid(x @ r.gate.weight.T))
        torch.testing.assert_close(w.sum(-1), torch.full((64,), 1.7, dtype=torch.float64))
        # gate weights are always the normalized unbiased affinities of the chosen experts
        torch.testing.assert_close(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 1.7)
        blist = [0.0] * n_experts if b is None else b.tolist()
        for t in range(64):
            ref = hand_route(s[t].tolist(), blist, n_groups, n_limited, top_k, 1.7)
            assert as_dict(w[t], idx[t]) == pytest.approx(ref)


def test_bias_only_reorders_selection_randomized():
    torch.manual_seed(1)
    r = GroupLimitedRouter(16, 8, 2, 4, 2, route_scale=1.0).double()
    x = torch.randn(256, 16, dtype=torch.float64)
    w0, i0, s = r(x)
    w1, i1, _ = r(x, 0.3 * torch.randn(8, dtype=torch.float64))
    changed = (i0.sort(-1).values != i1.sort(-1).values).any(-1)
    assert changed.any() and not changed.all()
    same = ~changed
    # same selection -> identical weights; different selection -> weights from unbiased scores
    a = torch.zeros(256, 8, dtype=torch.float64).scatter(1, i0, w0)
    b = torch.zeros(256, 8, dtype=torch.float64).scatter(1, i1, w1)
    torch.testing.assert_close(a[same], b[same])
    torch.testing.assert_close(w1, s.gather(1, i1) / s.gather(1, i1).sum(-1, keepdim=True))


def test_router_bf16_weights_fp32_and_compiles_fullgraph():
    torch.manual_seed(0)
    r = GroupLimitedRouter(16, 8, 2, 4, 2, route_scale=1.0).to(torch.bfloat16)
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    bias = torch.zeros(8)
    w, idx, s = r(x, bias)
    assert w.dtype == torch.float32 and s.dtype == torch.float32
    cw, cidx, cs = torch.compile(r, backend="aot_eager", fullgraph=True)(x, bias)
    torch.testing.assert_close(cw, w)
    assert torch.equal(cidx, idx)


# ---------------------------------------------------------------------------------------------
# Forward / backward vs the token-by-token reference


def _grads(module, x, out):
    params = [p for p in module.parameters()]
    g = torch.randn_like(out)
    return torch.autograd.grad((out * g).sum(), [x] + params), g


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(n_groups=0, n_limited_groups=0, top_k=3, n_shared=0),
    dict(n_experts=16, n_groups=4, n_limited_groups=1, top_k=2, n_shared=2, route_scale=2.5),
])
def test_forward_and_grads_match_reference(cfg):
    moe = make_moe(**cfg).train()
    with torch.no_grad():
        moe.expert_bias.copy_(0.1 * torch.randn(moe.n_experts))
    x = torch.randn(2, 7, moe.dim, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    ref = reference_moe_forward(moe, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [x] + list(moe.parameters())
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    gate_pos = next(i for i, p in enumerate(params) if p is moe.router.gate.weight)
    assert got[gate_pos].abs().sum() > 0  # the gate learns through the gate weights
    assert moe.expert_bias.grad is None


def test_tokens_per_expert_counts_training_forwards_once():
    moe = make_moe().train()
    x = torch.randn(3, 5, moe.dim, dtype=torch.float64, requires_grad=True)
    _, idx, _ = moe.router(x.reshape(-1, moe.dim), moe.expert_bias)
    want = torch.bincount(idx.reshape(-1), minlength=moe.n_experts).double()
    moe(x)
    torch.testing.assert_close(moe.tokens_per_expert, want)
    assert moe.tokens_per_expert.sum() == 3 * 5 * moe.top_k
    # activation checkpointing recomputes forward inside backward: not counted twice
    moe.reset_load_counters()
    out = torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False)
    out.sum().backward()
    torch.testing.assert_close(moe.tokens_per_expert, want)
    # eval forwards (validation) do not feed the bias update
    moe.eval()
    with torch.no_grad():
        moe(x)
    torch.testing.assert_close(moe.tokens_per_expert, want)
    assert moe.dropped_tokens.item() == 0
    assert "tokens_per_expert" not in moe.state_dict() and "dropped_tokens" not in moe.state_dict()
    assert "expert_bias" in moe.state_dict()


# ---------------------------------------------------------------------------------------------
# Aux-loss-free balancing


def test_bias_update_moves_against_load_and_reduces_imbalance():
    dim, n_experts = 16, 8
    moe = make_moe(dim=dim, n_experts=n_experts, top_k=2, n_groups=0, n_limited_groups=0,
                   bias_update_rate=0.01, dtype=torch.float32).train()
    moe.router.gate.weight.requires_grad_(False)  # frozen gate
    torch.manual_seed(0)
    skew = torch.zeros(dim)
    skew[0] = 3.0
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 0.3)
        moe.router.gate.weight[:2, 0] = 1.0  # experts 0 and 1 like the common direction
    updater = ExpertBiasUpdater([moe])

    def step():
        x = 0.5 * torch.randn(4, 32, dim) + skew
        with torch.no_grad():
            moe(x)
        load = moe.tokens_per_expert.clone()
        bias_before = moe.expert_bias.clone()
        updater()
        return load, moe.expert_bias - bias_before

    load, delta = step()
    over, under = load > load.mean(), load < load.mean()
    assert over.any() and under.any()
    torch.testing.assert_close(delta[over], torch.full_like(delta[over], -0.01))
    torch.testing.assert_close(delta[under], torch.full_like(delta[under], 0.01))
    assert moe.tokens_per_expert.sum() == 0  # the updater resets the counts
    first = load_metrics(load)["moe/max_over_mean_load"]
    assert first > 2.5
    recent = torch.zeros(n_experts)
    for i in range(60):
        load, _ = step()
        if i >= 50:
            recent += load
    last = load_metrics(recent)["moe/max_over_mean_load"]  # averaged over the last 10 steps
    assert last < 1.25 < first
    # the bias of the favoured experts went down, the others' up
    assert (moe.expert_bias[:2] < 0).all() and moe.expert_bias[2:].mean() > 0


def test_load_metrics():
    load = torch.tensor([[4.0, 4.0, 4.0, 4.0], [8.0, 8.0, 0.0, 0.0]])
    m = load_metrics(load, dropped=torch.tensor([0.0, 4.0]))
    assert m["moe/max_over_mean_load"] == pytest.approx(2.0)
    assert m["moe/mean_max_over_mean_load"] == pytest.approx(1.5)
    assert m["moe/min_over_mean_load"] == pytest.approx(0.0)
    assert m["moe/routing_entropy"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["moe/min_routing_entropy"] == pytest.approx(0.5)
    assert m["moe/dead_expert_fraction"] == pytest.approx(2 / 8)
    assert m["moe/dropped_fraction"] == pytest.approx(4 / 32)
    assert m["moe/max_layer_dropped_fraction"] == pytest.approx(4 / 16)
    assert "moe/max_over_mean_ep_rank_load" not in m
    # EP 2: experts {0, 1} on rank 0, {2, 3} on rank 1; layer 0 balanced, layer 1 all on rank 0
    ep = load_metrics(load, ep_degree=2)
    assert ep["moe/max_over_mean_ep_rank_load"] == pytest.approx(16 / 8)
    assert ep["moe/mean_max_over_mean_ep_rank_load"] == pytest.approx((1.0 + 2.0) / 2)
    moes = [make_moe(seed=s, capacity_factor=0.5).train() for s in range(2)]
    for mo in moes:
        mo(torch.randn(2, 8, mo.dim, dtype=torch.float64))
    lo, dr = moe_load_counters(moes)
    assert lo.shape == (2, 8) and dr.shape == (2,)
    assert load_metrics(lo, dr)["moe/dropped_fraction"] == pytest.approx(dr.sum().item() / (2 * 16 * 2))


# ---------------------------------------------------------------------------------------------
# Sequence-wise balance loss


def test_seq_aux_loss_equals_hand_computation():
    alpha = 0.01
    moe = make_moe(seq_aux_loss_weight=alpha, n_experts=8, top_k=3).train()
    bsz, seqlen = 3, 5
    x = torch.randn(bsz, seqlen, moe.dim, dtype=torch.float64)
    moe(x)
    loss = moe.aux_loss
    E, K = moe.n_experts, moe.top_k
    _, idx, s = moe.router(x.reshape(-1, moe.dim), moe.expert_bias)
    idx, s = idx.view(bsz, seqlen, K).tolist(), s.view(bsz, seqlen, E).tolist()
    want = 0.0
    for b in range(bsz):
        f = [E / (K * seqlen) * sum(e in idx[b][t] for t in range(seqlen)) for e in range(E)]
        p = [sum(s[b][t][e] / sum(s[b][t]) for t in range(seqlen)) / seqlen for e in range(E)]
        want += alpha * sum(fi * pi for fi, pi in zip(f, p)) / bsz
    assert loss.dim() == 0 and loss.item() == pytest.approx(want, rel=1e-12)
    # differentiable through the affinities, not the counts
    (g,) = torch.autograd.grad(loss, moe.router.gate.weight)
    assert g.abs().sum() > 0
    # uniform affinities and a perfectly balanced choice give exactly alpha
    uni_s = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    uni_i = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert sequence_balance_loss(uni_s, uni_i).item() == pytest.approx(1.0)


def test_seq_aux_loss_under_activation_checkpointing():
    moe = make_moe(seq_aux_loss_weight=0.05).train()
    x = torch.randn(2, 6, moe.dim, dtype=torch.float64)
    params = list(moe.parameters())
    out = moe(x)
    want = torch.autograd.grad(out.sum() + moe.aux_loss, params)
    want_loss = moe.aux_loss.detach()
    out = torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False)
    aux = moe.aux_loss
    got = torch.autograd.grad(out.sum() + aux, params)
    assert moe.aux_loss is aux  # the recompute in backward does not replace it
    torch.testing.assert_close(aux.detach(), want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_seq_aux_loss_off_and_eval_is_zero():
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    moe = make_moe().train()
    moe(x)
    assert moe.aux_loss.dim() == 0 and moe.aux_loss.item() == 0.0
    moe = make_moe(seq_aux_loss_weight=0.1).eval()
    with torch.no_grad():
        moe(x)
    assert moe.aux_loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Capacity factor


def _skewed_moe(capacity_factor, **kw):
    moe = make_moe(n_groups=0, n_limited_groups=0, capacity_factor=capacity_factor, **kw).train()
    with torch.no_grad():
        moe.router.gate.weight[:3] += 0.4  # experts 0-2 are popular
    return moe


def _spy_experts(moe, wrap):
    """Replace the expert compute of moe's dispatch path by wrap(original)(rows, group_sizes)."""
    if moe.dispatch_mode == "static":
        original = moe._run_experts
        moe._run_experts = wrap(original)
        return lambda: setattr(moe, "_run_experts", original)
    original = moe.experts.forward
    moe.experts.forward = wrap(original)
    return lambda: setattr(moe.experts, "forward", original)


@pytest.mark.parametrize("dispatch,align", [("static", 1), ("static", 4), ("legacy", 1)])
def test_capacity_drops_exactly_the_over_capacity_assignments(dispatch, align):
    moe = _skewed_moe(0.5, dispatch=dispatch, group_align=align)
    bsz, seqlen = 2, 8
    n, k, E = bsz * seqlen, moe.top_k, moe.n_experts
    cap = moe.capacity(n)
    assert cap == math.ceil(0.5 * n * k / E) == 2
    x = torch.ones(bsz, seqlen, moe.dim, dtype=torch.float64) * 0.5 + torch.randn(bsz, seqlen, moe.dim, dtype=torch.float64)
    w, idx, _ = moe.router(x.reshape(n, -1), moe.expert_bias)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    want_dropped = (counts - cap).clamp_min(0).sum().item()
    assert want_dropped > 0

    # hand: per expert keep the `cap` largest gate weights
    keep_hand = torch.zeros(n, k, dtype=torch.bool)
    for e in range(E):
        slots = [(w[t, j].item(), t, j) for t in range(n) for j in range(k) if idx[t, j] == e]
        for _, t, j in sorted(slots, key=lambda v: (-v[0], v[1]))[:cap]:
            keep_hand[t, j] = True
    keep, kept_counts = capacity_dispatch(idx, w, counts, cap)
    assert torch.equal(keep.view(n, k), keep_hand)
    assert torch.equal(kept_counts, counts.clamp(max=cap))

    seen = []

    def spy(run):
        def counted(rows, num_tokens_per_expert):
            seen.append((rows.shape[0], num_tokens_per_expert.clone()))
            return run(rows, num_tokens_per_expert)
        return counted

    restore = _spy_experts(moe, spy)
    xg = x.clone().requires_grad_(True)
    out = moe(xg)
    n_rows, groups = seen[0]
    kept = counts.clamp(max=cap)
    # dropped assignments are not computed; each group padded to `align` rows
    assert torch.equal(groups, (kept + align - 1) // align * align)
    assert kept.sum().item() == n * k - want_dropped
    if dispatch == "static":  # static row count: E * capacity (< n k) plus the worst padding
        assert n_rows == E * cap + E * (align - 1)
    assert moe.dropped_tokens.item() == want_dropped
    torch.testing.assert_close(moe.tokens_per_expert, counts.double())  # load counted before dropping
    ref = reference_moe_forward(moe, xg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [xg] + list(moe.parameters())
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a dropped assignment is the same as a zero gate weight
    moe.capacity_factor = 0.0
    restore()
    with torch.no_grad():
        full = moe(x)
    assert not torch.allclose(full, out)


@pytest.mark.parametrize("dispatch", ["static", "legacy"])
def test_capacity_masks_uncomputed_rows_and_exact_row_path(dispatch):
    moe = _skewed_moe(0.75, dispatch=dispatch, group_align=4)
    x = torch.randn(2, 8, moe.dim, dtype=torch.float64) + 0.5
    with torch.no_grad():
        want = reference_moe_forward(moe, x)

    def garbage_tail(run):  # like the grouped-GEMM path: rows past the groups unspecified
        def tail_nan(rows, num_tokens_per_expert):
            out = run(rows, num_tokens_per_expert)
            out[int(num_tokens_per_expert.sum()):] = float("nan")
            return out
        return tail_nan

    restore = _spy_experts(moe, garbage_tail)
    with torch.no_grad():
        got = moe(x)
    assert moe.dropped_tokens.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    restore()
    experts_forward = moe.experts.forward

    def exact_only(rows, num_tokens_per_expert):  # like expert parallel: rows must match the counts
        assert rows.shape[0] == int(num_tokens_per_expert.sum())
        return experts_forward(rows, num_tokens_per_expert)

    moe.experts.forward = exact_only
    moe._experts_need_exact_rows = lambda: True
    with torch.no_grad():
        got = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_capacity_large_factor_and_eval_drop_nothing():
    x = torch.randn(2, 8, 12, dtype=torch.float64) + 0.5
    plain = _skewed_moe(0.0)
    with torch.no_grad():
        want = plain(x)
    for cf, mode in ((8.0, "train"), (0.5, "eval")):
        moe = _skewed_moe(cf)
        getattr(moe, mode)()
        with torch.no_grad():
            got = moe(x)
        assert moe.dropped_tokens.item() == 0
        torch.testing.assert_close(got, want)


def test_capacity_dispatch_compiles_fullgraph():
    torch.manual_seed(0)
    idx = torch.randint(0, 8, (64, 2))
    w = torch.rand(64, 2)
    counts = torch.zeros(8, dtype=torch.int64).scatter_add_(0, idx.reshape(-1), torch.ones(128, dtype=torch.int64))
    fn = torch.compile(capacity_dispatch, backend="aot_eager", fullgraph=True)
    a, b = fn(idx, w, counts, 12)
    c, d = capacity_dispatch(idx, w, counts, 12)
    assert torch.equal(a, c) and torch.equal(b, d)


# ---------------------------------------------------------------------------------------------
# Static dispatch: no host sync, compiles whole


def test_row_layout_groups_pads_and_inverts():
    torch.manual_seed(1)
    n, k, E, align = 10, 2, 4, 4
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    layout = moe_dispatch.row_layout(flat, counts, k, None, 0, align)
    assert layout.n_rows == n * k + E * (align - 1)
    start = 0
    for e in range(E):  # by hand: expert e's assignments in (token, slot) order, then padding
        slots = [a for a in range(n * k) if flat[a] == e]
        size = -(-len(slots) // align) * align
        assert layout.group_sizes[e].item() == size
        assert layout.slot_of_row[start:start + len(slots)].tolist() == slots
        assert layout.token_of_row[start:start + len(slots)].tolist() == [a // k for a in slots]
        assert (layout.token_of_row[start + len(slots):start + size] == -1).all()
        start += size
    assert (layout.token_of_row[start:] == -1).all()
    real = layout.slot_of_row >= 0
    assert torch.equal(layout.row_of_slot[layout.slot_of_row[real]], torch.arange(layout.n_rows)[real])
    x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    rows = moe_dispatch.dispatch(x, layout, k)
    assert torch.equal(rows[real], x.detach()[layout.token_of_row[real]]) and (rows[~real] == 0).all()
    # gathers only, also in backward: the gradient equals the plain-indexing one
    g = torch.randn_like(rows)
    want, = torch.autograd.grad((x[layout.token_of_row.clamp_min(0)] * real[:, None] * g).sum(), x)
    got, = torch.autograd.grad((rows * g).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    back = moe_dispatch.combine(rows, layout)
    assert torch.equal(back, x.detach().repeat_interleave(k, 0))


def _compiled_equals_eager(device, backend, capacity_factor):
    """The MoE forward + backward in train mode, compiled whole (fullgraph: no graph break, so
    no host sync in the routed path), against the same module run eagerly."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = DeepSeekMoE(64, 8, 2, 1, 32, 4, 2, 1.0, 0.01, use_grouped_mm=True,
                      capacity_factor=capacity_factor, seq_aux_loss_weight=0.01)
    moe.init_weights(0.1, 0.05)
    moe = moe.to(device).train()
    x = torch.randn(2, 24, 64, device=device)
    grads, outs, counts = [], [], []
    for run in (moe, torch.compile(moe, backend=backend, fullgraph=True, dynamic=False)):
        moe.reset_load_counters()
        xg = x.clone().requires_grad_(True)
        out = run(xg)
        ((out * out).sum() + moe.aux_loss).backward()
        outs.append(out.detach())
        grads.append([xg.grad] + [p.grad.clone() for p in moe.parameters()])
        counts.append((moe.tokens_per_expert.clone(), moe.dropped_tokens.clone()))
        moe.zero_grad()
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    assert torch.equal(counts[1][0], counts[0][0]) and torch.equal(counts[1][1], counts[0][1])
    assert counts[0][0].sum() == 2 * 24 * 2
    assert (counts[0][1] > 0) == (capacity_factor > 0)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_static_dispatch_compiles_fullgraph_and_equals_eager(capacity_factor):
    # torch._grouped_mm (bf16) has a CPU kernel: the CUDA path, traced on the CPU
    _compiled_equals_eager("cpu", "aot_eager", capacity_factor)


def test_compiled_checkpointed_moe_counts_once():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch._dynamo.reset()
    moe = make_moe(dtype=torch.float32, capacity_factor=0.5).train()
    x = torch.randn(2, 8, moe.dim)
    moe(x)
    want = (moe.tokens_per_expert.clone(), moe.dropped_tokens.clone())
    wrapped = checkpoint_wrapper(moe, preserve_rng_state=False)
    wrapped.compile(backend="aot_eager", dynamic=False)  # the loop path: host sync, not fullgraph
    for _ in range(2):
        moe.reset_load_counters()
        wrapped(x.clone().requires_grad_(True)).sum().backward()
        torch.testing.assert_close(moe.tokens_per_expert, want[0])
        torch.testing.assert_close(moe.dropped_tokens, want[1])


# ---------------------------------------------------------------------------------------------
# Grouped GEMM on CUDA


def _grouped_vs_loop(dtype, capacity_factor, dispatch="static"):
    torch.manual_seed(0)
    kw = dict(dim=256, n_experts=16, top_k=4, n_shared=1, inter_dim=128, n_groups=4, n_limited_groups=2,
              route_scale=2.5, bias_update_rate=0.001, capacity_factor=capacity_factor)
    loop = DeepSeekMoE(use_grouped_mm=False, dispatch="legacy", **kw)
    loop.init_weights(0.02, 0.01)
    loop = loop.to("cuda", dtype).train()
    grouped = DeepSeekMoE(use_grouped_mm=True, dispatch=dispatch, **kw).to("cuda", dtype).train()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = loop(x1), grouped(x2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    # the grouped path always computes in bf16 (torchtitan), so tolerances are bf16-sized
    tol = dict(rtol=2e-2, atol=2e-2 * y1.abs().max().item())
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2e-2, atol=2e-2 * x1.grad.abs().max().item())
    w1, w2 = loop.experts.w1.grad, grouped.experts.w1.grad
    torch.testing.assert_close(w2, w1, rtol=2e-2, atol=2e-2 * w1.abs().max().item())
    assert torch.equal(loop.tokens_per_expert, grouped.tokens_per_expert)
    assert torch.equal(loop.dropped_tokens, grouped.dropped_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
@pytest.mark.parametrize("dispatch", ["static", "legacy"])
def test_grouped_mm_matches_loop_cuda(dtype, capacity_factor, dispatch):
    _grouped_vs_loop(dtype, capacity_factor, dispatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_static_dispatch_inductor_fullgraph_cuda(capacity_factor):
    _compiled_equals_eager("cuda", "inductor", capacity_factor)


# ---------------------------------------------------------------------------------------------
# Top-k combine: fused weighted sum vs batched matmul
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_sum_combine_equals_einsum_combine(capacity_factor):
    """The default "sum" combine gives the einsum form's output and gradients (float64; with
    the capacity limit, dropped assignments carry zero weight in both)."""
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    results = []
    for combine in ("einsum", "sum"):
        moe = make_moe(top_k=3, seed=4, combine=combine, capacity_factor=capacity_factor).train()
        xi = x.clone().requires_grad_(True)
        out = moe(xi)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [xi, *moe.parameters()])
        results.append((out, grads))
    (o_ref, g_ref), (o, g) = results
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_sum_combine_has_no_batched_matmul_in_forward_or_backward():
    """What "sum" is for: inductor receives pointwise ops for the combine, not a bmm (cuBLAS's
    batched kernels for 1 x k x dim products), in the forward and the backward graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def bmm_count(combine):
        counts = []

        def count(gm, _inputs):
            counts.append(sum(n.target == torch.ops.aten.bmm.default for n in gm.graph.nodes))
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        moe = make_moe(top_k=3, seed=4, combine=combine, dtype=torch.float32).train()
        fn = torch.compile(moe, backend=aot_autograd(fw_compiler=count, bw_compiler=count), fullgraph=True)
        fn(torch.randn(2, 9, 12, requires_grad=True)).sum().backward()
        return counts

    assert bmm_count("sum") == [0, 0]
    assert sum(bmm_count("einsum")) > 0  # the check can see the batched matmul


def test_sum_combine_keeps_the_expert_outputs_narrow_for_backward():
    """bf16 expert outputs combined with float32 router weights: autograd keeps the bf16 rows
    (as the einsum under autocast did), not float32 copies of them (2x the memory)."""
    moe = make_moe(top_k=3, combine="sum", dtype=torch.float32)
    weights = torch.rand(10, 3, requires_grad=True)
    per_slot = torch.randn(10, 3, 12, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = moe._combine(weights, per_slot, torch.float32)
    assert out.dtype == torch.float32
    rows = [t for t in saved if t.dim() == 2 and t.shape == (10, 12)]
    assert rows and all(t.dtype == torch.bfloat16 for t in rows), [(t.dtype, t.shape) for t in saved]
    # and the same values as the float32 computation
    ref = torch.einsum("nk,nkd->nd", weights.double(), per_slot.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_unknown_combine_is_refused():
    with pytest.raises(ValueError, match="moe_combine = 'dot'"):
        make_moe(combine="dot")

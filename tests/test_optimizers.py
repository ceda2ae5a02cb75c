"""CPU tests for fusion_titan.optim: Newton-Schulz, NorMuon, Muon, CautiousAdamW, and
FSDP2 (2 ranks, gloo) == 1 process."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fusion_titan.bench.host_ops import top_level_aten_ops
from fusion_titan.optim import CautiousAdamW, Muon, NorMuon, zeropower_via_newtonschulz5
from newton_schulz_reference import reference_newton_schulz

# --------------------------------------------------------------------------- NS5


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (4, 16, 24), (3, 40, 8)])
def test_newton_schulz_singular_values(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    S = torch.linalg.svdvals(X)
    # Keller Jordan's coefficients do not converge to exactly 1: after 5 steps a
    # Gaussian matrix's singular values sit in about [0.68, 1.21].
    assert S.min() > 0.6 and S.max() < 1.25, (S.min(), S.max())
    assert 0.75 < S.mean() < 1.0
    # The band is a real test: the normalized input itself is far from it.
    S_in = torch.linalg.svdvals(G / G.norm(dim=(-2, -1), keepdim=True))
    assert not (S_in.min() > 0.6 and S_in.max() < 1.25)


def test_newton_schulz_keeps_singular_vectors_and_dtypes():
    torch.manual_seed(1)
    G = torch.randn(20, 12)
    X = zeropower_via_newtonschulz5(G)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    # X = U S' V^T with S' diagonal: U^T X V must be (nearly) diagonal.
    D = U.T @ X @ Vh.T
    off = D - torch.diag(torch.diagonal(D))
    assert off.abs().max() < 1e-4
    # bf16 iterations, float64 in -> float64 out
    X64 = zeropower_via_newtonschulz5(G.double(), dtype=torch.bfloat16)
    assert X64.dtype == torch.float64
    assert (X64.float() - X).abs().max() < 0.1


# ----------------------------------------------------------------------- NorMuon


def _ref_normuon(W, grads, lr, wd, beta1, beta2, eps, nesterov=True, update_scale="adamw"):
    """NorMuon written out from the paper's formulas, one 2-D matrix (independent float64 NS5)."""
    W = W.clone()
    m, n = W.shape
    M = torch.zeros_like(W)
    v = torch.zeros(m, 1)
    for G in grads:
        M = beta1 * M + (1 - beta1) * G
        U = (1 - beta1) * G + beta1 * M if nesterov else M
        O = reference_newton_schulz(U, steps=5).to(U.dtype)
        row_ms = (O * O).sum(dim=1, keepdim=True) / n
        v = beta2 * v + (1 - beta2) * row_ms
        O_hat = O / (torch.sqrt(v) + eps)
        if update_scale == "adamw":
            step = 0.2 * math.sqrt(m * n) * O_hat / torch.linalg.norm(O_hat)
        else:
            step = torch.linalg.norm(O) / torch.linalg.norm(O_hat) * O_hat * math.sqrt(max(1, m / n))
        W = W - lr * wd * W - lr * step
    return W, M, v


@pytest.mark.parametrize("shape", [(6, 10), (12, 5)])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("update_scale", ["adamw", "muon"])
def test_normuon_matches_reference(shape, nesterov, update_scale):
    torch.manual_seed(2)
    W0 = torch.randn(*shape)
    grads = [torch.randn(*shape) for _ in range(2)]
    lr, wd, b1, b2, eps = 0.05, 0.1, 0.9, 0.8, 1e-8

    p = nn.Parameter(W0.clone())
    opt = NorMuon([p], lr=lr, weight_decay=wd, momentum=b1, beta2=b2, eps=eps,
                  nesterov=nesterov, update_scale=update_scale)
    for G in grads:
        p.grad = G.clone()
        opt.step()

    W_ref, M_ref, v_ref = _ref_normuon(W0, grads, lr, wd, b1, b2, eps, nesterov, update_scale)
    torch.testing.assert_close(p.detach(), W_ref, atol=1e-6, rtol=1e-5)
    st = opt.state[p]
    torch.testing.assert_close(st["momentum_buffer"], M_ref, atol=1e-6, rtol=1e-5)
    assert st["second_moment"].shape == (shape[0], 1)
    torch.testing.assert_close(st["second_moment"], v_ref, atol=1e-7, rtol=1e-5)
    # The step really normalizes per row: with "adamw" the update RMS is 0.2*lr.
    if update_scale == "adamw":
        p2 = nn.Parameter(W0.clone())
        o2 = NorMuon([p2], lr=lr, weight_decay=0.0)
        p2.grad = grads[0].clone()
        o2.step()
        rms = (p2.detach() - W0).pow(2).mean().sqrt()
        assert abs(rms.item() - 0.2 * lr) < 1e-6


def test_normuon_param_groups_and_no_grad():
    torch.manual_seed(3)
    a, b, c = (nn.Parameter(torch.randn(4, 6)) for _ in range(3))
    opt = NorMuon([{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b, c]}],
                  lr=0.01, weight_decay=0.0)
    a0, b0, c0 = a.detach().clone(), b.detach().clone(), c.detach().clone()
    ga, gb = torch.randn(4, 6), torch.randn(4, 6)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(a.detach(), _ref_normuon(a0, [ga], 0.1, 0.5, 0.95, 0.95, 1e-8)[0])
    torch.testing.assert_close(b.detach(), _ref_normuon(b0, [gb], 0.01, 0.0, 0.95, 0.95, 1e-8)[0])
    assert torch.equal(c.detach(), c0) and c not in opt.state
    with pytest.raises(ValueError):
        NorMuon([nn.Parameter(torch.randn(5))])


def test_normuon_experts_equal_per_expert_2d():
    torch.manual_seed(4)
    E, m, n = 3, 5, 7
    W0 = torch.randn(E, m, n)
    grads = [torch.randn(E, m, n) for _ in range(2)]
    kw = dict(lr=0.03, weight_decay=0.05, momentum=0.9, beta2=0.9)

    p = nn.Parameter(W0.clone())
    opt = NorMuon([p], **kw)
    experts = [nn.Parameter(W0[e].clone()) for e in range(E)]
    opt2d = NorMuon(experts, **kw)
    for G in grads:
        p.grad = G.clone()
        for e in range(E):
            experts[e].grad = G[e].clone()
        opt.step()
        opt2d.step()
    torch.testing.assert_close(p.detach(), torch.stack([x.detach() for x in experts]),
                               atol=1e-6, rtol=1e-5)
    assert opt.state[p]["second_moment"].shape == (E, m, 1)
    torch.testing.assert_close(opt.state[p]["second_moment"],
                               torch.stack([opt2d.state[x]["second_moment"] for x in experts]))


# -------------------------------------------------------------------------- Muon


def _ref_muon(W, grads, lr, wd, beta, nesterov=True, update_scale="muon"):
    """Muon written out in float64 from Keller Jordan's reference code, one 2-D matrix:
    momentum.lerp_(g, 1 - beta); update = g.lerp_(momentum, beta) if nesterov else momentum;
    NS5; scale max(1, rows/cols)**0.5 ("muon") or to RMS 0.2 ("adamw"); decoupled decay."""
    W = W.to(torch.float64).clone()
    m, n = W.shape
    M = torch.zeros_like(W)
    for G in grads:
        G = G.to(torch.float64)
        M = beta * M + (1 - beta) * G
        U = (1 - beta) * G + beta * M if nesterov else M
        O = reference_newton_schulz(U, steps=5)
        if update_scale == "muon":
            step = O * max(1, m / n) ** 0.5
        else:
            step = O * 0.2 * math.sqrt(m * n) / torch.linalg.norm(O)
        W = W * (1 - lr * wd) - lr * step
    return W, M


@pytest.mark.parametrize("shape", [(6, 10), (12, 5)])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("update_scale", ["muon", "adamw"])
def test_muon_matches_reference(shape, nesterov, update_scale):
    torch.manual_seed(12)
    W0 = torch.randn(*shape)
    grads = [torch.randn(*shape) for _ in range(3)]
    lr, wd, beta = 0.02, 0.01, 0.9

    def trained(cls):
        p = nn.Parameter(W0.clone())
        opt = cls([p], lr=lr, weight_decay=wd, momentum=beta, nesterov=nesterov,
                  update_scale=update_scale)
        for G in grads:
            p.grad = G.clone()
            opt.step()
        return p.detach(), opt.state[p]

    W, state = trained(Muon)
    W_ref, M_ref = _ref_muon(W0, grads, lr, wd, beta, nesterov, update_scale)
    torch.testing.assert_close(W, W_ref.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state["momentum_buffer"], M_ref.float(), atol=1e-6, rtol=1e-5)
    assert set(state) == {"momentum_buffer"}  # no second moment: plain Muon
    # the step is not NorMuon's: same options, different weights
    assert (trained(NorMuon)[0] - W).abs().max() > 1e-5


def test_muon_experts_groups_and_vectors():
    """3-D expert stacks step per expert; groups keep their own lr / decay; no-grad params stay;
    vectors are refused with the fix named."""
    torch.manual_seed(13)
    E, m, n = 3, 5, 7
    W0 = torch.randn(E, m, n)
    A0 = torch.randn(4, 6)
    grads = [torch.randn(E, m, n) for _ in range(2)]
    ga = [torch.randn(4, 6) for _ in range(2)]
    experts, a, idle = nn.Parameter(W0.clone()), nn.Parameter(A0.clone()), nn.Parameter(torch.randn(4, 6))
    opt = Muon([{"params": [experts]}, {"params": [a, idle], "lr": 0.1, "weight_decay": 0.5}],
               lr=0.03, weight_decay=0.05, momentum=0.9)
    for G, g in zip(grads, ga):
        experts.grad, a.grad = G.clone(), g.clone()
        opt.step()
    want = torch.stack([_ref_muon(W0[e], [G[e] for G in grads], 0.03, 0.05, 0.9)[0] for e in range(E)])
    torch.testing.assert_close(experts.detach(), want.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.detach(), _ref_muon(A0, ga, 0.1, 0.5, 0.9)[0].float(),
                               atol=1e-6, rtol=1e-5)
    assert idle not in opt.state
    with pytest.raises(ValueError, match="element-wise optimizer"):
        Muon([nn.Parameter(torch.randn(5))])


# ------------------------------------------------------------------ CautiousAdamW


def _ref_cautious_adamw(W, grads, lr, wd, beta1, beta2, eps):
    W = W.clone()
    m = torch.zeros_like(W)
    v = torch.zeros_like(W)
    fractions = []
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        u = m_hat / (torch.sqrt(v_hat) + eps)
        keep = (u * g > 0).float()
        frac = max(keep.mean().item(), 1e-3)
        fractions.append(keep.mean().item())
        u = u * keep / frac
        decay = ((g * W) > 0).float()
        W = W - lr * wd * W * decay - lr * u
    return W, fractions


def test_normuon_batches_same_shape_matrices_like_separate_calls(monkeypatch):
    """An owner's same-shape matrices arrive as one stack, orthogonalized in Newton-Schulz calls
    of at most NS_BATCH_ELEMENTS (plus one matrix); the result must equal orthogonalizing each
    matrix on its own."""
    import fusion_titan.optim.orthogonalized_momentum as shared

    torch.manual_seed(0)
    stacks = [torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(1, 4, 6, dtype=torch.float64)]
    monkeypatch.setattr(shared, "NS_BATCH_ELEMENTS", 60)  # force several calls per stack
    calls = []
    real = shared.zeropower_via_newtonschulz5

    def counting(G, **kw):
        calls.append(G.shape[0])
        return real(G, **kw)

    monkeypatch.setattr(shared, "zeropower_via_newtonschulz5", counting)
    opt = NorMuon([nn.Parameter(torch.zeros(1, 1))], ns_dtype=torch.float64)
    group = dict(opt.param_groups[0])
    seconds = [torch.rand(u.shape[0], u.shape[1], 1) for u in stacks]  # state is fp32
    batched = opt._directions(list(zip(stacks, seconds)), group)
    for U, V, (D, V_new) in zip(stacks, seconds, batched):
        assert D.shape == U.shape and V_new.shape == V.shape
        for b in range(U.shape[0]):
            D_alone, v_alone = opt._direction(real(U[b:b + 1], steps=5, dtype=torch.float64),
                                              V[b:b + 1], group)
            torch.testing.assert_close(D[b:b + 1], D_alone)
            torch.testing.assert_close(V_new[b:b + 1], v_alone)
    # 24-element matrices, cut at 60: stacks of 3 (72 >= 60), then the rest
    assert calls == [3, 2, 1], calls


# Several same-shape matrices, a 3-D expert stack of the same shape (one mixed batch), another
# shape with its own stack, and a shape of one: what the batched step stacks and splits.
MANY_SHAPES = [(6, 10), (3, 6, 10), (6, 10), (12, 5), (4, 12, 5), (8, 8), (6, 10), (12, 5)]


def _per_matrix_reference(W0, grads, kw, optimizer):
    """(weights, momentum, second moment or None) of the textbook per-matrix update of one
    parameter (2-D, or 3-D stepped expert by expert)."""
    lr, wd, beta1 = kw["lr"], kw["weight_decay"], kw["momentum"]
    stack = W0 if W0.ndim == 3 else W0[None]
    runs = []
    for e in range(stack.shape[0]):
        gs = [(G if G.ndim == 3 else G[None])[e] for G in grads]
        if optimizer is NorMuon:
            runs.append(_ref_normuon(stack[e], gs, lr, wd, beta1, kw["beta2"], 1e-8))
        else:
            W, M = _ref_muon(stack[e], gs, lr, wd, beta1)
            runs.append((W.float(), M.float(), None))
    out = [torch.stack([r[k] for r in runs]) if runs[0][k] is not None else None for k in range(3)]
    return [t if t is None or W0.ndim == 3 else t[0] for t in out]


@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_step_matches_per_matrix_reference(optimizer, weight_decay):
    """Many parameters of several shapes (stacked, split back with foreach ops) over several
    steps equal the per-matrix textbook update of each: weights, momentum, second moment."""
    torch.manual_seed(14)
    W0 = [torch.randn(s) for s in MANY_SHAPES]
    grads = [[torch.randn(s) for s in MANY_SHAPES] for _ in range(3)]
    kw = dict(lr=0.04, weight_decay=weight_decay, momentum=0.9)
    if optimizer is NorMuon:
        kw["beta2"] = 0.8
    params = [nn.Parameter(w.clone()) for w in W0]
    opt = optimizer(params, **kw)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for k, p in enumerate(params):
        W_ref, M_ref, v_ref = _per_matrix_reference(W0[k], [step[k] for step in grads], kw, optimizer)
        torch.testing.assert_close(p.detach(), W_ref, atol=1e-6, rtol=1e-5, msg=str(k))
        state = opt.state[p]
        torch.testing.assert_close(state["momentum_buffer"], M_ref, atol=1e-6, rtol=1e-5)
        if v_ref is not None:
            torch.testing.assert_close(state["second_moment"], v_ref, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(params[0].detach(), W0[0])


def _step_ops(optimizer, copies: int) -> int:
    """Top-level ATen ops of the third step of `optimizer` over `copies` matrices of each of two
    shapes, plus a 3-D expert stack and a matrix of a shape of its own."""
    torch.manual_seed(15)
    shapes = [(16, 24)] * copies + [(24, 16)] * copies + [(4, 16, 24), (8, 8)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = optimizer(params, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    return top_level_aten_ops(opt.step)


@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
def test_step_launches_do_not_grow_with_the_number_of_matrices(optimizer):
    """The step's ops are per same-shape batch, not per parameter: on a GPU each op is a launch
    and microseconds of host time, and the step is host-bound when they grow with the model."""
    few, many = _step_ops(optimizer, 8), _step_ops(optimizer, 32)
    assert many - few <= 2, f"{optimizer.__name__}: {few} ops for 8 matrices per shape, {many} for 32"
    assert few < 200, f"{optimizer.__name__}: {few} ops for 3 batches"


def test_cautious_adamw_matches_reference():
    torch.manual_seed(5)
    shape = (7, 9)
    W0 = torch.randn(*shape)
    g1 = torch.randn(*shape)
    # Step 2: flip the sign of the gradient on about half the entries so the
    # cautious mask drops them (momentum still points the old way).
    flip = torch.rand(*shape) < 0.5
    g2 = torch.where(flip, -0.5 * g1, g1 + 0.1 * torch.randn(*shape))
    g3 = torch.randn(*shape)
    grads = [g1, g2, g3]
    lr, wd, b1, b2, eps = 1e-2, 0.3, 0.9, 0.95, 1e-8

    p = nn.Parameter(W0.clone())
    opt = CautiousAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()

    W_ref, fractions = _ref_cautious_adamw(W0, grads, lr, wd, b1, b2, eps)
    # the test exercises masking: step 2 really keeps only part of the update
    assert 0.2 < fractions[1] < 0.8
    # ... and skips weight decay where grad * param <= 0
    assert 0 < ((g1 * W0) > 0).float().mean() < 1
    torch.testing.assert_close(p.detach(), W_ref, atol=1e-6, rtol=1e-5)
    assert opt.state[p]["step"].item() == 3


def test_cautious_adamw_decay_mask_only():
    # zero moments effect: with lr*update tiny relative to decay we can read off
    # the decay mask directly.
    W0 = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5])
    g = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])  # grad*W: +, -, -, +, 0
    p = nn.Parameter(W0.clone())
    opt = CautiousAdamW([p], lr=0.1, weight_decay=1.0, cautious=False)
    p.grad = g.clone()
    opt.step()
    # first step update = sign(g) (up to eps); decay only on entries 0 and 3
    expected = W0 - 0.1 * W0 * torch.tensor([1.0, 0, 0, 1.0, 0]) - 0.1 * torch.sign(g)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_cautious_adamw_plain_equals_torch_adamw():
    torch.manual_seed(6)
    W0 = torch.randn(5, 4)
    grads = [torch.randn(5, 4) for _ in range(3)]
    p1, p2 = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    o1 = CautiousAdamW([p1], lr=1e-2, weight_decay=0.1, cautious=False, cautious_wd=False)
    o2 = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------- FSDP2, 2 ranks


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)  # weight rows split 3/3
        self.fc2 = nn.Linear(6, 5)  # rows split 3/2 (uneven), bias 3/2
        self.experts = nn.Parameter(torch.randn(3, 4, 6))  # Shard(0): experts 2/1
        self.experts_rows = nn.Parameter(torch.randn(2, 6, 4))  # Shard(1): rows 3/3 (FSDP2 needs even non-0 dims)


def _run_case(mesh):
    """Build the model (sharded if mesh), take 2 steps with both optimizer
    setups, return full params and optimizer state."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    out = {}
    for setup in ("normuon", "cautious"):
        torch.manual_seed(0)
        model = _Tiny()
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=mesh,
                        shard_placement_fn=lambda p: Shard(1) if p is model.experts_rows else None)
        params = dict(model.named_parameters())
        if setup == "normuon":
            mats = [p for p in params.values() if p.ndim >= 2]
            vecs = [p for p in params.values() if p.ndim < 2]
            opts = [NorMuon(mats, lr=0.02, weight_decay=0.1),
                    CautiousAdamW(vecs, lr=1e-2, weight_decay=0.1)]
        else:
            opts = [CautiousAdamW(params.values(), lr=1e-2, weight_decay=0.1)]

        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for name, p in params.items():
                g = torch.randn(p.shape, generator=gen)
                if mesh is not None:
                    # every rank holds the same full grad: take the local chunk, no comm
                    g = distribute_tensor(g, mesh, p.placements, src_data_rank=None)
                p.grad = g
            for o in opts:
                o.step()

        full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()
        for name, p in params.items():
            out[f"{setup}/{name}"] = full(p)
            for o in opts:
                if p in o.state:
                    for k, v in o.state[p].items():
                        if mesh is not None and k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                            assert isinstance(v, DTensor) and v.placements == p.placements
                        if mesh is not None and k == "second_moment":
                            assert isinstance(v, DTensor) and v.placements == p.placements
                        out[f"{setup}/{name}/{k}"] = full(v)
        if mesh is not None and setup == "normuon":
            # torchtitan/DCP path: the state dict must be collectable.
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            for o in opts:
                sd = get_optimizer_state_dict(model, o)
                assert len(sd["state"]) > 0
    return out


def _fsdp_worker(rank, world_size, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
        out = _run_case(mesh)
        if rank == 0:
            torch.save(out, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_ranks_equal_one_process():
    expected = _run_case(None)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        mp.spawn(_fsdp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
        got = torch.load(out_path)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)
    # sanity: the optimizers actually moved the weights
    torch.manual_seed(0)
    init = _Tiny()
    assert not torch.allclose(expected["normuon/fc1.weight"], init.fc1.weight)


def test_cautious_mask_means_keep_the_parameters_order_across_meshes(tmp_path):
    """The mask means are computed mesh by mesh in a regrouped order (one all-reduce per mesh):
    each must come back to its own parameter, DTensors of two meshes and plain tensors mixed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh_a, mesh_b = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1,), mesh_dim_names=("b",))
        gen = torch.Generator().manual_seed(3)
        masks = [(torch.rand(n, generator=gen) > 0.5).float() for n in (7, 5, 9, 4, 6)]
        meshes = [mesh_a, None, mesh_b, mesh_a, None]
        params = [torch.zeros(m.shape) if mesh is None
                  else distribute_tensor(torch.zeros(m.shape), mesh, [Replicate()]) for m, mesh in zip(masks, meshes)]
        means = CautiousAdamW._global_means(masks, params)
        for got, m in zip(means, masks):
            assert got.item() == pytest.approx(m.mean().item())
    finally:
        dist.destroy_process_group()

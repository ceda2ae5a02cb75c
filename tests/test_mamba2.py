"""SSD op and Mamba2 layer: chunked form vs. token-by-token reference, cache, causality, init."""

import pytest
import torch
import torch.nn.functional as F

from fusion_titan.model.mixers.mamba2 import Mamba2, Mamba2Cache
from fusion_titan.ops.ssd import segsum, ssd_chunked, ssd_recurrent, ssd_step
from mixer_checks import assert_causal, assert_prefill_in_pieces, assert_prefill_then_decode, rel_err



def make_inputs(b, T, H, P, G, N, dtype=torch.float64, device="cpu", with_h0=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = randn(b, T, H, P)
    dt = F.softplus(randn(b, T, H) - 1.0)  # > 0, spread over roughly [0.05, 2]
    A = -torch.exp(randn(H))  # < 0
    B = randn(b, T, G, N)
    C = randn(b, T, G, N)
    h0 = randn(b, H, P, N) if with_h0 else None
    out = [t.to(dtype=dtype, device=device) for t in (x, dt, A, B, C)]
    out.append(None if h0 is None else h0.to(dtype=dtype, device=device))
    return out


SHAPES = [
    # b, T, H, P, G, N, chunk_size
    (2, 50, 4, 8, 2, 6, 16),  # T not a multiple of the chunk, 2 groups of 2 heads
    (1, 64, 2, 4, 1, 8, 16),  # exact multiple, one group
    (2, 37, 3, 6, 3, 4, 64),  # a single partial chunk, one head per group
    (1, 130, 4, 4, 2, 8, 64),  # default chunk size, 3 chunks
    (1, 5, 2, 4, 1, 4, 8),  # shorter than one chunk
    (1, 9, 2, 3, 1, 2, 1),  # chunk of one token
]


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("b,T,H,P,G,N,L", SHAPES)
def test_chunked_matches_recurrent_forward_float64(b, T, H, P, G, N, L, with_h0):
    x, dt, A, B, C, h0 = make_inputs(b, T, H, P, G, N, with_h0=with_h0)
    y1, s1 = ssd_chunked(x, dt, A, B, C, chunk_size=L, initial_state=h0, output_final_state=True)
    y2, s2 = ssd_recurrent(x, dt, A, B, C, chunk_size=L, initial_state=h0, output_final_state=True)
    assert y1.shape == (b, T, H, P) and y1.dtype == torch.float64
    assert s1.shape == (b, H, P, N) and s1.dtype == torch.float64
    assert rel_err(y1, y2) < 1e-12
    assert rel_err(s1, s2) < 1e-12
    # The final state is only returned when asked for.
    assert ssd_chunked(x, dt, A, B, C, chunk_size=L, initial_state=h0)[1] is None
    assert ssd_recurrent(x, dt, A, B, C, initial_state=h0)[1] is None


@pytest.mark.parametrize("b,T,H,P,G,N,L", [SHAPES[0], SHAPES[2], SHAPES[4]])
def test_chunked_matches_recurrent_grads_float64(b, T, H, P, G, N, L):
    inputs = [t.requires_grad_() for t in make_inputs(b, T, H, P, G, N, with_h0=True, seed=1)]
    gen = torch.Generator().manual_seed(2)
    dy = torch.randn(b, T, H, P, generator=gen, dtype=torch.float64)
    ds = torch.randn(b, H, P, N, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (ssd_chunked, ssd_recurrent):
        y, s = fn(*inputs[:5], chunk_size=L, initial_state=inputs[5], output_final_state=True)
        grads.append(torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs))
    for name, g1, g2 in zip(["x", "dt", "A", "B", "C", "h0"], *grads):
        assert torch.isfinite(g1).all(), name
        assert rel_err(g1, g2) < 1e-10, name


def test_step_matches_recurrent_and_does_not_mutate_state():
    x, dt, A, B, C, h0 = make_inputs(2, 3, 4, 5, 2, 3, with_h0=True, seed=3)
    h0_copy = h0.clone()
    y, s = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0)
    y_ref, s_ref = ssd_recurrent(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], initial_state=h0, output_final_state=True)
    assert torch.equal(h0, h0_copy)
    assert torch.allclose(y, y_ref[:, 0]) and torch.allclose(s, s_ref)


def test_segsum_values_and_mask():
    a = torch.tensor([0.5, -1.0, -2.0, -0.25], dtype=torch.float64)
    S = segsum(a)
    cs = a.cumsum(0)
    for i in range(4):
        for j in range(4):
            if j <= i:
                assert torch.isclose(S[i, j], cs[i] - cs[j])
            else:
                assert S[i, j] == float("-inf")


def test_strong_decay_no_overflow():
    # Huge dt * |A| gives log decays of about -1e4 per step: cumsum differences would lose
    # everything in float32 and exp(+large) would overflow without masking first.
    x, dt, A, B, C, h0 = make_inputs(1, 40, 2, 4, 1, 4, dtype=torch.float32, with_h0=True, seed=4)
    dt = dt * 100.0
    A = A * 100.0
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, h0)]
    y, s = ssd_chunked(*inputs[:5], chunk_size=16, initial_state=inputs[5], output_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    (y.sum() + s.sum()).backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all()
    y_ref, s_ref = ssd_recurrent(*(t.detach().double() for t in inputs[:5]), initial_state=h0.detach().double(),
                                 output_final_state=True)
    assert rel_err(y.detach().double(), y_ref) < 1e-4


def test_float32_and_bf16_close_to_float64_reference():
    x, dt, A, B, C, h0 = make_inputs(2, 100, 4, 8, 2, 16, with_h0=True, seed=5)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0, output_final_state=True)
    y32, s32 = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), initial_state=h0.float(), output_final_state=True)
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    assert rel_err(y32.double(), y_ref) < 1e-4 and rel_err(s32.double(), s_ref) < 1e-4
    # bf16 activations: output in bf16, state still accumulated in float32.
    ybf, sbf = ssd_chunked(x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16(),
                           initial_state=h0.float(), output_final_state=True)
    assert ybf.dtype == torch.bfloat16 and sbf.dtype == torch.float32
    assert rel_err(ybf.double(), y_ref) < 5e-2


def test_torch_compile_smoke():
    x, dt, A, B, C, h0 = make_inputs(1, 40, 4, 8, 2, 4, dtype=torch.float32, with_h0=True)
    fn = torch.compile(lambda *a, h0: ssd_chunked(*a, chunk_size=16, initial_state=h0, output_final_state=True),
                       backend="eager", fullgraph=True)
    y1, s1 = fn(x, dt, A, B, C, h0=h0)
    y2, s2 = ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=h0, output_final_state=True)
    assert torch.allclose(y1, y2) and torch.allclose(s1, s2)


# ---------------------------------------------------------------------------
# Layer
# ---------------------------------------------------------------------------


def make_layer(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=32, n_heads=4, head_dim=8, d_state=6, n_groups=2, conv_size=4, chunk_size=8)
    cfg.update(kw)
    layer = Mamba2(**cfg)
    layer.init_weights(0.02, 0.02)
    with torch.no_grad():
        # Larger output weights and decays than the default init, so differences are not hidden
        # by tiny outputs and the state really carries information across chunks.
        layer.out_proj.weight.normal_(0, 0.2)
        layer.dt_bias.add_(2.0)
    return layer.to(dtype)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("prefill", [0, 1, 2, 7, 20])
def test_layer_prefill_then_decode_matches_full(prefill, norm_before_gate):
    layer = make_layer(norm_before_gate=norm_before_gate)
    B = 2
    cache = Mamba2Cache()
    assert_prefill_then_decode(layer, cache, layer.dim, prefill, batch=B)
    assert cache.ssm_state.shape == (B, layer.n_heads, layer.head_dim, layer.d_state)
    assert cache.conv_state.shape == (B, layer.conv_size - 1, 32 + 2 * 2 * 6)


def test_layer_chunked_prefill_in_pieces():
    # Two multi-token calls with a cache (the chunked path with an initial state).
    layer = make_layer(seed=1)
    assert_prefill_in_pieces(layer, Mamba2Cache(), layer.dim, seq_len=45, split=30)


def test_layer_causality():
    layer = make_layer(seed=2)
    assert_causal(layer, layer.dim)


def test_layer_shapes_backward_and_meta_init():
    cfg = dict(dim=32, n_heads=4, head_dim=16, d_state=8, n_groups=2)
    with torch.device("meta"):
        layer = Mamba2(**cfg)
    layer.to_empty(device="cpu")
    layer.init_weights(0.01, 0.01)
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    A = layer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 1e-1 + 1e-7)).all()
    assert torch.equal(layer.D, torch.ones(4))
    assert torch.equal(layer.norm.weight, torch.ones(64))
    # Same parameter set as a layer built directly on CPU.
    assert {n: p.shape for n, p in layer.named_parameters()} == {
        n: p.shape for n, p in Mamba2(**cfg).named_parameters()
    }
    x = torch.randn(2, 70, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_layer_bf16_forward():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 20, layer.dim)
    ref = layer(x)
    y = layer.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < 5e-2


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_chunked_vs_cpu_float64_reference():
    x, dt, A, B, C, h0 = make_inputs(2, 300, 8, 64, 2, 128, with_h0=True, seed=6)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0, output_final_state=True)
    cuda = [t.float().cuda() for t in (x, dt, A, B, C, h0)]
    y, s = ssd_chunked(*cuda[:5], initial_state=cuda[5], output_final_state=True)
    assert rel_err(y.double().cpu(), y_ref) < 1e-3
    assert rel_err(s.double().cpu(), s_ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_bf16_compile():
    layer = make_layer(dtype=torch.float32, dim=256, n_heads=8, head_dim=64, d_state=64, n_groups=1,
                       chunk_size=64).cuda()
    x = torch.randn(2, 500, 256, device="cuda")
    ref = layer(x)
    layer = layer.to(torch.bfloat16)
    y = torch.compile(layer)(x.bfloat16())
    y.float().square().mean().backward()
    assert rel_err(y.float(), ref) < 5e-2

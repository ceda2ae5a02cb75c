"""Our Triton gated delta rule (forward and backward) against the float64 token-by-token reference.

On CPU the kernels run under the Triton interpreter, which must be switched on before triton is
imported: test_kernels_under_triton_interpreter reruns this file's `interpreted` tests in a
subprocess with TRITON_INTERPRET=1 (or run them directly:
`TRITON_INTERPRET=1 python -m pytest -q tests/test_gated_delta_rule_triton.py -k interpreted`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_titan.ops.gated_delta_rule import fla_is_safe, gated_delta_rule, recurrent_gated_delta_rule
from mixer_checks import rel_err
from test_gated_delta_rule import make_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher")
def test_kernels_under_triton_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-3000:]


@pytest.fixture
def interpreted():
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess")
    from fusion_titan.ops.gated_delta_rule_triton import triton_chunk_gated_delta_rule

    return triton_chunk_gated_delta_rule


def _gdn_like_tril(n, K=16, seed=0):
    """n strictly lower 64x64 matrices shaped like the op's A: beta_i k_i.k_j exp(G_i - G_j)."""
    q, k, v, g, beta, _ = make_inputs(n, 64, 1, K, K, seed=seed)
    k, g, beta = k[:, :, 0], g[:, :, 0], beta[:, :, 0]
    G = g.cumsum(1)
    return (beta[:, :, None] * (k @ k.transpose(1, 2)) * (G[:, :, None] - G[:, None, :]).exp()).tril(-1)


def _unit_lower_inverse_reference(A):
    eye = torch.eye(A.shape[-1], dtype=torch.float64).expand_as(A)
    return torch.linalg.solve_triangular(eye + A, eye, upper=False)


def _inverse_cases():
    gen = torch.Generator().manual_seed(21)
    dense = 0.3 * torch.randn(3, 64, 64, generator=gen, dtype=torch.float64).tril(-1)
    one_block = torch.zeros(1, 64, 64, dtype=torch.float64)  # only block (3, 1): checks where the merge puts it
    one_block[0, 48:, 16:32] = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    padded = _gdn_like_tril(2, seed=22)
    padded[:, 37:] = 0.0  # a last chunk of 37 tokens: padding rows are zero
    return {"dense": dense, "gdn_like": _gdn_like_tril(4, seed=23), "one_block": one_block, "padded": padded}


@pytest.mark.parametrize("case", ["dense", "gdn_like", "one_block", "padded"])
def test_interpreted_blocked_inverse_vs_float64_solve(interpreted, case):
    from fusion_titan.ops.unit_lower_inverse_triton import unit_lower_inverse

    A = _inverse_cases()[case]
    ref = _unit_lower_inverse_reference(A)
    assert torch.allclose(ref, torch.linalg.inv(torch.eye(64, dtype=torch.float64) + A))  # the reference itself
    Ai = unit_lower_inverse(A.float())
    assert Ai.dtype == torch.float32 and Ai.shape == A.shape
    assert torch.equal(Ai.triu(1), torch.zeros_like(Ai))  # exactly lower triangular, unit diagonal
    assert torch.equal(Ai.diagonal(dim1=-2, dim2=-1), torch.ones(A.shape[:-1]))
    assert rel_err(Ai.double(), ref) < 1e-5, rel_err(Ai.double(), ref)


def test_interpreted_blocked_inverse_refuses_other_sizes(interpreted):
    from fusion_titan.ops.unit_lower_inverse_triton import unit_lower_inverse

    with pytest.raises(ValueError, match="float32"):
        unit_lower_inverse(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="float32"):
        unit_lower_inverse(torch.zeros(2, 64, 64, dtype=torch.float64))


def reference_and_grads(inputs, do, dS, scale=None):
    """float64 recurrent outputs, final state and the gradients of every given input."""
    leaves = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    o, s = recurrent_gated_delta_rule(*leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True)
    used = [x for x in leaves if x is not None]
    return o, s, torch.autograd.grad((o * do).sum() + (s * dS).sum(), used)


def run_ours(fn, inputs, do, dS, dtype, scale=None):
    leaves = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in inputs]
    o, s = fn(*leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True)
    used = [x for x in leaves if x is not None]
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * dS).sum(), used)
    return o, s, grads


SHAPES = [
    # B, T, H, K, V: T not a multiple of the 64-token chunk, K != V, not powers of 2
    (2, 100, 2, 16, 24),
    (1, 64, 3, 32, 16),  # exactly one chunk
    (1, 150, 1, 64, 128),  # three chunks, the model's head dims
    (2, 7, 1, 8, 8),  # shorter than a chunk, dims below tl.dot's 16
]


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
def test_interpreted_matches_float64_reference(interpreted, B, T, H, K, V, with_h0):
    inputs = make_inputs(B, T, H, K, V, with_h0=with_h0, seed=1)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    o_ref, s_ref, g_ref = reference_and_grads(inputs, do, dS)
    o, s, grads = run_ours(interpreted, inputs, do, dS, torch.float32)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert s.shape == (B, H, K, V) and s.dtype == torch.float32
    assert rel_err(o.double(), o_ref) < 1e-5
    assert rel_err(s.double(), s_ref) < 1e-5
    names = ["q", "k", "v", "g", "beta", "h0"][: len(grads)]
    for name, a, b in zip(names, grads, g_ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a.double(), b) < 1e-5, (name, rel_err(a.double(), b))


def _contiguous(x):
    return x.clone()


def _short_conv_layout(x):
    """x [B, T, H, D] with the strides the model gives q/k/v (a [B, C, T] conv output transposed
    and viewed as [B, T, H, D]): same values, not contiguous."""
    B, T, H, D = x.shape
    return x.reshape(B, T, H * D).transpose(1, 2).contiguous().transpose(1, 2).view(B, T, H, D)


def test_interpreted_every_kernel_tunes_per_problem_size(interpreted):
    """Each kernel's autotune key names its head dims and the size buckets, all of them arguments
    of the kernel (triton 3.6's autotune drops other names without a word): keyed on the head
    dims alone, a choice made at the tests' small shapes most likely served the model's."""
    from fusion_titan.ops import gated_delta_rule_triton as ours

    tuned = {name: obj for name, obj in vars(ours).items() if isinstance(obj, ours._FixedConfig)}
    assert len(tuned) == 7, sorted(tuned)
    for name, kernel in tuned.items():
        wanted = {"BH_BUCKET", "N_BUCKET", "K", "V"} & set(kernel.fn.arg_names)
        assert {"BH_BUCKET", "N_BUCKET", "K"} <= wanted, name
        assert set(kernel.keys) == wanted, f"{name}: keyed on {kernel.keys}, wanted {wanted}"
    # buckets: the model's T 4096 and an evaluation batch padded to 4000 share a choice; a 2x
    # longer sequence or 2x the sequences get their own
    N = lambda T: -(-T // ours.CHUNK)  # noqa: E731
    assert ours._size_buckets(4, 8, N(4000)) == ours._size_buckets(4, 8, N(4096)) == (32, 64)
    assert len({ours._size_buckets(4, 8, N(4096)), ours._size_buckets(4, 8, N(8192)),
                ours._size_buckets(8, 8, N(4096))}) == 3


def test_interpreted_custom_ops_pass_opcheck(interpreted):
    """Schema, fake (meta) shapes and autograd registration of the forward and backward ops agree
    with what the kernels do (torch.library.opcheck), with and without initial / final state."""
    from fusion_titan.ops import gated_delta_rule_triton as ours

    q, k, v, g, beta, h0 = (x.float() for x in make_inputs(1, 70, 2, 16, 32, with_h0=True, seed=8))
    for initial, final, layout in ((h0, True, _contiguous), (None, False, _short_conv_layout)):
        leaves = [layout(x).requires_grad_() for x in (q, k, v)] + [x.clone().requires_grad_() for x in (g, beta)]
        if initial is not None:
            initial = initial.clone().requires_grad_()
        torch.library.opcheck(ours._forward, (*leaves, 0.25, initial, final))
        with torch.no_grad():  # as autograd calls the backward op (no double backward)
            o, ht, *saved = ours._forward(*leaves, 0.25, initial, final)
        dht = torch.randn_like(ht) if final else None
        h0_in = None if initial is None else initial.detach()
        torch.library.opcheck(ours._backward, (*[x.detach() for x in leaves], *saved,
                                               torch.randn_like(o), dht, h0_in, 0.25))


def test_interpreted_runs_inside_a_fullgraph_compile(interpreted):
    """backend "triton" inside torch.compile(fullgraph=True) with inductor (the whole-block compile
    of training) on q/k/v laid out as the model gives them and with transposed consumers: no graph
    break, and the compiled output and gradients are the eager ones."""
    q, k, v, g, beta, h0 = make_inputs(2, 80, 2, 16, 16, with_h0=True, seed=9)

    def block(q, k, v, g, beta, h0):
        o, s = gated_delta_rule(q * 1.0, k, v, g, beta, initial_state=h0, output_final_state=True,
                                backend="triton")
        # consumers that read o and the state transposed: their gradients arrive non-contiguous
        w = torch.arange(o.shape[1], dtype=o.dtype).view(1, -1, 1, 1)
        o_t = o.transpose(1, 3).contiguous().transpose(1, 3)
        return (o.sin() * 2.0).sum() + (o_t * w).cos().sum() + s.transpose(2, 3).square().sum()

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = ([_short_conv_layout(x.float()).requires_grad_() for x in (q, k, v)]
                  + [x.float().requires_grad_() for x in (g, beta, h0)])
        assert not leaves[0].is_contiguous()
        loss = fn(*leaves)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch.allclose(loss, eager_loss, rtol=1e-5)  # inductor fuses sin/square differently
    for a, b in zip(grads, eager_grads):
        # to fp32 resolution of the largest entries (inductor's do differs by an ulp; entries near
        # zero then differ by an ulp of the sums they come from, so no element-wise rtol)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_interpreted_without_final_state_and_custom_scale(interpreted):
    q, k, v, g, beta, h0 = make_inputs(1, 90, 2, 16, 16, with_h0=True, seed=3)
    do = torch.randn(1, 90, 2, 16, dtype=torch.float64)
    leaves = [x.float().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o, s = interpreted(*leaves[:5], scale=0.3, initial_state=leaves[5])
    assert s is None
    grads = torch.autograd.grad((o.double() * do).sum(), leaves)  # no gradient for the final state
    ref_leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_ref, _ = recurrent_gated_delta_rule(*ref_leaves[:5], scale=0.3, initial_state=ref_leaves[5])
    g_ref = torch.autograd.grad((o_ref * do).sum(), ref_leaves)
    assert rel_err(o.double(), o_ref) < 1e-5
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], grads, g_ref):
        assert rel_err(a.double(), b) < 1e-5, name


def test_interpreted_strong_decay_stays_finite(interpreted):
    # exp(G_i - G_j) above the diagonal would overflow; the kernels mask before exponentiating.
    q, k, v, g, beta, h0 = make_inputs(1, 80, 1, 16, 16, with_h0=True, seed=4)
    g = g - 30.0
    leaves = [x.float().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o, s = interpreted(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    o_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    assert rel_err(o.double(), o_ref) < 1e-5
    grads = torch.autograd.grad(o.sum() + s.sum(), leaves)
    assert all(torch.isfinite(x).all() for x in grads)


def test_interpreted_bf16_inputs(interpreted):
    inputs = make_inputs(2, 80, 2, 32, 32, with_h0=True, seed=5)
    o_ref, s_ref = recurrent_gated_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    o, s = interpreted(*[x.bfloat16() for x in inputs[:5]], initial_state=inputs[5].float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o.double(), o_ref) < 2e-2
    assert rel_err(s.double(), s_ref) < 2e-2


def test_interpreted_bf16_gradients(interpreted):
    """The GPU test's dtypes (q, k, v, beta bf16; g and the state float32) at a small size, forward
    and backward: bf16 products and storage stay within the GPU test's tolerances of float64."""
    inputs = make_inputs(1, 100, 2, 32, 32, with_h0=True, seed=8)
    gen = torch.Generator().manual_seed(9)
    do = torch.randn(1, 100, 2, 32, generator=gen, dtype=torch.float64)
    dS = torch.randn(1, 2, 32, 32, generator=gen, dtype=torch.float64)
    o_ref, s_ref, g_ref = reference_and_grads(inputs, do, dS)
    dtypes = [torch.bfloat16] * 3 + [torch.float32, torch.bfloat16, torch.float32]
    leaves = [x.to(dt).requires_grad_() for x, dt in zip(inputs, dtypes)]
    o, s = interpreted(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * dS).sum(), leaves)
    assert rel_err(o.double(), o_ref) < 2e-2 and rel_err(s.double(), s_ref) < 2e-2
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], grads, g_ref):
        assert rel_err(a.double(), b) < 5e-2, (name, rel_err(a.double(), b))


def test_interpreted_dispatcher_triton_backend(interpreted):
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 16, 16, with_h0=True, seed=6)
    f32 = [x.float() for x in (q, k, v, g, beta, h0)]
    o, s = gated_delta_rule(*f32[:5], initial_state=f32[5], output_final_state=True, backend="triton")
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel_err(o.double(), o_ref) < 1e-5 and rel_err(s.double(), s_ref) < 1e-5
    with pytest.raises(ValueError, match="document_ids"):
        gated_delta_rule(*f32[:5], backend="triton", document_ids=torch.zeros(1, 70, dtype=torch.long))
    with pytest.raises(ValueError, match="float64"):
        gated_delta_rule(q, k, v, g, beta, backend="triton")


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g, beta, _ = make_inputs(1, 8, 1, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        gated_delta_rule(q, k, v, g, beta, backend="triton")


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


def _bf16_case(B=2, T=300, H=4, K=64, V=128, seed=7):
    inputs = make_inputs(B, T, H, K, V, with_h0=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return inputs, do, dS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_bf16_vs_cpu_float64_reference():
    inputs, do, dS = _bf16_case()
    o_ref, s_ref, g_ref = reference_and_grads(inputs, do, dS)
    # q, k, v, beta in bf16 as the layer feeds them; g and the state in float32
    dtypes = [torch.bfloat16] * 3 + [torch.float32, torch.bfloat16, torch.float32]
    leaves = [x.to("cuda", dt).requires_grad_() for x, dt in zip(inputs, dtypes)]
    o, s = gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True, backend="triton")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    loss = (o.double() * do.cuda()).sum() + (s.double() * dS.cuda()).sum()
    grads = torch.autograd.grad(loss, leaves)
    assert rel_err(o.double().cpu(), o_ref) < 2e-2
    assert rel_err(s.double().cpu(), s_ref) < 2e-2
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], grads, g_ref):
        assert a.dtype == leaves[["q", "k", "v", "g", "beta", "h0"].index(name)].dtype
        assert rel_err(a.double().cpu(), b) < 5e-2, (name, rel_err(a.double().cpu(), b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["dense", "gdn_like", "padded"])
def test_gpu_blocked_inverse_vs_float64_solve(case):
    from fusion_titan.ops.unit_lower_inverse_triton import unit_lower_inverse

    A = _inverse_cases()[case]
    Ai = unit_lower_inverse(A.float().cuda())
    assert rel_err(Ai.double().cpu(), _unit_lower_inverse_reference(A)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_float32_tight_vs_reference():
    inputs, do, dS = _bf16_case(B=1, T=200, H=2, seed=9)
    o_ref, s_ref, g_ref = reference_and_grads(inputs, do, dS)
    fn = lambda *a, **kw: gated_delta_rule(*a, **kw, backend="triton")  # noqa: E731
    o, s, grads = run_ours(fn, [x.cuda() for x in inputs], do.cuda(), dS.cuda(), torch.float32)
    assert rel_err(o.double().cpu(), o_ref) < 1e-4 and rel_err(s.double().cpu(), s_ref) < 1e-4
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], grads, g_ref):
        assert rel_err(a.double().cpu(), b) < 1e-4, (name, rel_err(a.double().cpu(), b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_forward_vs_fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception as e:  # not installed, or broken triton
        pytest.skip(f"fla not importable: {e}")
    (q, k, v, g, beta, h0), _, _ = _bf16_case(B=2, T=1000, seed=11)
    args = [x.bfloat16().cuda() for x in (q, k, v)] + [g.float().cuda(), beta.bfloat16().cuda()]
    with torch.no_grad():
        o_fla, s_fla = fla_chunk(*args, initial_state=h0.float().cuda(), output_final_state=True)
        o, s = gated_delta_rule(*args, initial_state=h0.float().cuda(), output_final_state=True, backend="triton")
    assert rel_err(o.float(), o_fla.float()) < 2e-2
    assert rel_err(s.float(), s_fla.float()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_runs_triton_where_fla_is_unsafe():
    if fla_is_safe()[0]:
        pytest.skip("fla is safe here, 'auto' picks it")
    (q, k, v, g, beta, _), _, _ = _bf16_case(B=1, T=130, H=2, seed=13)
    args = [x.bfloat16().cuda() for x in (q, k, v)] + [g.float().cuda(), beta.bfloat16().cuda()]
    o_auto, _ = gated_delta_rule(*args, backend="auto")
    o_triton, _ = gated_delta_rule(*args, backend="triton")
    assert torch.equal(o_auto, o_triton)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_under_compile_calls_the_triton_op():
    """Inside a fullgraph compile "auto" must take our Triton op (fla would be a graph break,
    the PyTorch form is slower), and the compiled call gives the eager op's output."""
    (q, k, v, g, beta, _), _, _ = _bf16_case(B=1, T=130, H=2, seed=17)
    args = [x.bfloat16().cuda() for x in (q, k, v)] + [g.float().cuda(), beta.bfloat16().cuda()]
    graphs = []

    def capture(gm, _example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: gated_delta_rule(*a, backend="auto")[0], backend=capture, fullgraph=True)
    o_compiled = compiled(*args)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("gated_delta_rule_fwd" in t for t in targets), targets
    o_triton, _ = gated_delta_rule(*args, backend="triton")
    assert torch.equal(o_compiled, o_triton)


def test_kernel_resources_script_compiles_for_sm90_without_a_gpu():
    """scripts/gdn_kernel_resources.py: every config of a kernel compiled for sm_90 on this machine,
    with its registers and spills read back by cuobjdump (the figures docs/performance.md quotes)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "scripts/gdn_kernel_resources.py", "--only", "_fwd_output_kernel"],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| _fwd_output_kernel")]
    assert len(rows) == 3  # its three autotune configs
    for row in rows:
        regs, stack = int(row[5]), int(row[6])
        assert 0 < regs <= 255 and stack >= 0
        assert int(row[8]) > 0  # Hopper's wgmma path, not the older mma.sync


def test_bench_gdn_loads_other_versions_of_the_kernels_beside_the_current_one(tmp_path):
    """scripts/bench_gdn.py --version git:REV / PATH: another kernel file as its own module, its
    custom ops in their own namespace (so both register in one process), or one clear error."""
    from test_eval import script

    bench = script("bench_gdn")
    other = bench.load_version("git:HEAD")
    assert callable(other.triton_chunk_gated_delta_rule)
    assert other._OPS != "fusion_titan" and hasattr(getattr(torch.ops, other._OPS), "gated_delta_rule_fwd")
    copy = tmp_path / "kernels.py"
    copy.write_text((Path(__file__).resolve().parents[1] / bench.KERNEL_FILE).read_text())
    assert bench.load_version(str(copy))._OPS not in ("fusion_titan", other._OPS)
    with pytest.raises(SystemExit, match="pass the file's path"):
        bench.load_version("git:no-such-revision")
    with pytest.raises(SystemExit, match="no such file"):
        bench.load_version(str(tmp_path / "missing.py"))

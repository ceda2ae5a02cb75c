"""Multi-head Latent Attention and the attention backends behind it.

Everything is checked against code written here from the papers' equations (explicit loops over
heads and positions), not against the module's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusion_titan.model.args import FusionModelArgs
from fusion_titan.model.mixers.mla import MLACache, MultiHeadLatentAttention
from fusion_titan.model.rope import rope_cache
from fusion_titan.ops import attention as attn_ops
from fusion_titan.ops.attention import causal_attention, flash_available, flex_block_mask

CPU_BACKENDS = ["reference", "sdpa", "flex", "auto"]


# ----------------------------------------------------------------------------------------------
# independent implementations


def loop_attention(q, k, v, scale, window=0, document_ids=None):
    """[B,H,T,D] attention, one query at a time; k/v may have fewer (grouped) heads."""
    bsz, n_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    rep = n_heads // k.shape[1]
    out = torch.zeros(bsz, n_heads, q_len, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(n_heads):
            for i in range(q_len):
                pos = k_len - q_len + i
                keys = [
                    j for j in range(k_len)
                    if j <= pos and (window <= 0 or j > pos - window)
                    and (document_ids is None or document_ids[b, j] == document_ids[b, pos])
                ]
                s = torch.stack([q[b, h, i].double() @ k[b, h // rep, j].double() for j in keys]) * scale
                p = s.softmax(0)
                out[b, h, i] = sum(p[n] * v[b, h // rep, j].double() for n, j in enumerate(keys))
    return out


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, positions, theta):
    """Rotate-half RoPE of x [..., T, D] at integer positions, in float64, from theta directly."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    ang = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def mla_by_hand(mod: MultiHeadLatentAttention, x, args: FusionModelArgs):
    """DeepSeek-V2 §2.1 written out: per head, with the module's parameters (so grads flow)."""
    bsz, seqlen, _ = x.shape
    H, G = mod.n_heads, mod.n_kv_groups
    nope, rd, vd, r = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
    pos = list(range(seqlen))
    if args.q_lora_rank > 0:
        c_q = rms_norm(x @ mod.wq_a.weight.T, mod.q_norm.weight, args.norm_eps)
        q = c_q @ mod.wq_b.weight.T
    else:
        q = x @ mod.wq.weight.T
    kv_a = x @ mod.wkv_a.weight.T
    c_kv = rms_norm(kv_a[..., :r], mod.kv_norm.weight, args.norm_eps)
    k_rope = rotate(kv_a[..., r:], pos, args.rope_theta)  # one rope key for all heads
    scale = 1.0 / math.sqrt(nope + rd)
    window = args.sliding_window
    mask = torch.tensor(
        [[j <= i and (window <= 0 or j > i - window) for j in range(seqlen)] for i in range(seqlen)]
    )
    heads = []
    for h in range(H):
        g = h // (H // G)
        q_h = q[..., h * (nope + rd):(h + 1) * (nope + rd)]
        q_nope, q_rope = q_h[..., :nope], rotate(q_h[..., nope:], pos, args.rope_theta)
        w_g = mod.wkv_b.weight[g * (nope + vd):(g + 1) * (nope + vd)]
        k_nope, v = c_kv @ w_g[:nope].T, c_kv @ w_g[nope:].T
        scores = (q_nope @ k_nope.transpose(1, 2) + q_rope @ k_rope.transpose(1, 2)) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(probs @ v)
    return torch.cat(heads, dim=-1) @ mod.wo.weight.T


def small_args(**overrides) -> FusionModelArgs:
    base = dict(
        dim=48, n_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, max_seq_len=64, sliding_window=0,
        attn_backend="reference", norm_eps=1e-6, rope_theta=10000.0,
    )
    base.update(overrides)
    return FusionModelArgs(**base)


def make_mla(args, n_kv_groups=None, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    mod = MultiHeadLatentAttention(args, n_kv_groups=n_kv_groups).to(dtype)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))  # non-trivial norm gains
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    rope = rope_cache(args.qk_rope_head_dim, args.max_seq_len, args.rope_theta, dtype=dtype)
    return mod, rope


def doc_ids(bsz, seqlen, seed=1):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(bsz, seqlen, generator=g) < 0.15
    starts[:, 0] = True
    return starts.long().cumsum(-1)


# ----------------------------------------------------------------------------------------------
# backends


def test_reference_matches_loops():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 6), torch.randn(1, 2, 9, 6), torch.randn(1, 2, 9, 4)
    for window in (0, 3):
        out = attn_ops.reference_attention(q.double(), k.double(), v.double(), 0.4, window)
        torch.testing.assert_close(out, loop_attention(q, k, v, 0.4, window))
    ids = doc_ids(1, 9)
    out = attn_ops.reference_attention(q.double(), k.double(), v.double(), 0.4, 3, ids)
    torch.testing.assert_close(out, loop_attention(q, k, v, 0.4, 3, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])  # "auto" is sdpa on CPU
@pytest.mark.parametrize("window", [0, 5, 100])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("q_len", [37, 1, 4])
def test_backend_matches_reference(dtype, backend, window, docs, n_kv, q_len):
    torch.manual_seed(0)
    bsz, n_heads, k_len = 2, 4, 37
    q = torch.randn(bsz, n_heads, q_len, 24, dtype=dtype)
    k = torch.randn(bsz, n_kv, k_len, 24, dtype=dtype)
    v = torch.randn(bsz, n_kv, k_len, 16, dtype=dtype)
    ids = doc_ids(bsz, k_len) if docs else None
    scale = 24 ** -0.5
    expected = attn_ops.reference_attention(q, k, v, scale, window, ids)
    out = causal_attention(q, k, v, scale=scale, window=window, backend=backend, document_ids=ids)
    assert out.dtype == dtype and out.shape == (bsz, n_heads, q_len, 16)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(out, expected, **tol)


def test_backend_dispatch_and_errors():
    q = torch.randn(1, 2, 8, 8)
    assert attn_ops.resolve_backend("auto", q, window=4) == "sdpa"  # flex only on CUDA
    assert attn_ops.resolve_backend("auto", q) == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        causal_attention(q, q, q, backend="nope")
    if not flash_available():
        with pytest.raises(RuntimeError, match="flash-attn"):
            causal_attention(q, q, q, backend="flash")


def test_flex_block_masks_are_cached():
    a = flex_block_mask(40, 40, 5, "cpu")
    assert flex_block_mask(40, 40, 5, "cpu") is a
    assert flex_block_mask(40, 40, 0, "cpu") is not a
    ids = doc_ids(2, 40)
    d = flex_block_mask(40, 40, 0, "cpu", ids)
    assert flex_block_mask(40, 40, 0, "cpu", ids) is d  # every layer of a step shares it
    ids2 = ids.clone()
    assert flex_block_mask(40, 40, 0, "cpu", ids2) is not d
    ids2[:, -1] += 1  # in-place edit: version changes, rebuilt
    e = flex_block_mask(40, 40, 0, "cpu", ids2)
    assert flex_block_mask(40, 40, 0, "cpu", ids2) is e
    ids2[:, 0] += 0
    assert flex_block_mask(40, 40, 0, "cpu", ids2) is not e


# ----------------------------------------------------------------------------------------------
# MLA module


@pytest.mark.parametrize("q_lora_rank", [32, 0])
@pytest.mark.parametrize("n_kv_groups", [4, 2, 1])
@pytest.mark.parametrize("window", [0, 5])
def test_mla_forward_and_grad_match_by_hand(q_lora_rank, n_kv_groups, window):
    args = small_args(q_lora_rank=q_lora_rank, sliding_window=window, attn_backend="sdpa")
    mod, rope = make_mla(args, n_kv_groups)
    assert mod.wkv_b.weight.shape[0] == n_kv_groups * (16 + 12)
    x = torch.randn(2, 13, args.dim, dtype=torch.float64, requires_grad=True)
    out = mod(x, rope)
    ref = mla_by_hand(mod, x, args)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)

    w = torch.randn_like(out)
    params = [x] + list(mod.parameters())
    g_mod = torch.autograd.grad((out * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g_mod, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mla_backends_agree_with_document_mask(backend):
    args = small_args(sliding_window=6)
    ref_mod, rope = make_mla(args.replace(attn_backend="reference"), n_kv_groups=2)
    mod, _ = make_mla(args.replace(attn_backend=backend), n_kv_groups=2)
    x = torch.randn(2, 30, args.dim, dtype=torch.float64)
    ids = doc_ids(2, 30)
    with torch.no_grad():  # no autograd: flex itself runs (it has no CPU backward)
        out = mod(x, rope, document_ids=ids)
        torch.testing.assert_close(out, ref_mod(x, rope, document_ids=ids))
        # tokens of the first document do not reach the later ones
        y = x.clone()
        first = ids[0] == ids[0, 0]
        y[0, first] += 1.0
        torch.testing.assert_close(mod(y, rope, document_ids=ids)[0, ~first], out[0, ~first])
        assert (mod(y, rope, document_ids=ids)[0, first] - out[0, first]).abs().amax(-1).min() > 1e-6


def test_flex_cpu_backward_falls_back_to_masked_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, d, dtype=torch.float64, requires_grad=True) for d in (8, 8, 4))
    ids = doc_ids(1, 12)
    with pytest.warns(UserWarning, match="no backward on CPU"):
        attn_ops._warned.discard("flex_cpu_backward")
        out = causal_attention(q, k, v, window=5, backend="flex", document_ids=ids)
    ref = attn_ops.reference_attention(q, k, v, 8 ** -0.5, 5, ids)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
    )


def test_mla_is_causal():
    args = small_args()
    mod, rope = make_mla(args)
    x = torch.randn(1, 16, args.dim, dtype=torch.float64)
    y = x.clone()
    y[0, 9] += 1.0
    a, b = mod(x, rope), mod(y, rope)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sliding_window_limits_receptive_field(backend):
    window = 4
    args = small_args(sliding_window=window, attn_backend=backend)
    mod, rope = make_mla(args)
    x = torch.randn(1, 16, args.dim, dtype=torch.float64)
    y = x.clone()
    y[0, 3] += 1.0  # token 3 is seen by queries 3 .. 3 + window - 1 only
    a, b = mod(x, rope), mod(y, rope)
    torch.testing.assert_close(a[:, 3 + window:], b[:, 3 + window:], atol=1e-13, rtol=0)
    assert (a[:, 3:3 + window] - b[:, 3:3 + window]).abs().amax(-1).min() > 1e-6
    # without the window the change reaches the end
    full, _ = make_mla(args.replace(sliding_window=0))
    assert (full(x, rope)[:, -1] - full(y, rope)[:, -1]).abs().max() > 1e-6


@pytest.mark.parametrize("n_kv_groups", [2, 1])
def test_kv_groups_equal_repeated_kv(n_kv_groups):
    """G groups == full MLA whose wkv_b repeats each group's (W_UK, W_UV) for its heads."""
    args = small_args(sliding_window=5)
    grouped, rope = make_mla(args, n_kv_groups)
    full = MultiHeadLatentAttention(args).double()
    full.load_state_dict(
        {
            k: (v.view(n_kv_groups, -1, v.shape[-1]).repeat_interleave(4 // n_kv_groups, 0).reshape(-1, v.shape[-1])
                if k == "wkv_b.weight" else v)
            for k, v in grouped.state_dict().items()
        }
    )
    x = torch.randn(2, 11, args.dim, dtype=torch.float64)
    torch.testing.assert_close(grouped(x, rope), full(x, rope), atol=1e-12, rtol=1e-10)


def test_kv_groups_from_args_and_validation():
    args = small_args()
    args.mla_kv_groups = 2  # the field another change adds; read with getattr
    assert MultiHeadLatentAttention(args).n_kv_groups == 2
    args.mla_kv_groups = 0
    assert MultiHeadLatentAttention(args).n_kv_groups == 4
    with pytest.raises(ValueError, match="divide"):
        MultiHeadLatentAttention(small_args(), n_kv_groups=3)


# ----------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("absorb", [True, False])
@pytest.mark.parametrize("n_kv_groups", [4, 2])
@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_decode_with_cache_matches_full_forward(window, absorb, n_kv_groups, q_lora_rank):
    args = small_args(sliding_window=window, q_lora_rank=q_lora_rank, attn_backend="sdpa")
    mod, rope = make_mla(args, n_kv_groups)
    x = torch.randn(2, 20, args.dim, dtype=torch.float64)
    full = mod(x, rope)

    cache = mod.new_cache(batch=2)
    outs = [mod(x[:, :7], rope, cache=cache, absorb=absorb)]  # prefill
    assert cache.length == 7
    for t in range(7, 20):
        outs.append(mod(x[:, t:t + 1], rope, cache=cache, start_pos=t, absorb=absorb))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-10)
    assert cache.length == 20
    assert cache.c_kv.shape[1] == (min(20, window) if window else 20)
    assert cache.start == 20 - cache.c_kv.shape[1]


def test_absorbed_equals_naive_on_same_cache():
    args = small_args(sliding_window=6)
    mod, rope = make_mla(args, n_kv_groups=2)
    x = torch.randn(3, 15, args.dim, dtype=torch.float64)
    c1, c2 = mod.new_cache(3), mod.new_cache(3)
    for lo, hi in ((0, 9), (9, 10), (10, 13), (13, 14), (14, 15)):  # mixed chunk sizes
        a = mod(x[:, lo:hi], rope, cache=c1, absorb=True)
        b = mod(x[:, lo:hi], rope, cache=c2, absorb=False)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="continue"):
        mod(x[:, :1], rope, cache=c1, start_pos=3)


def test_cache_bytes_vs_mha():
    args = small_args()
    mod, rope = make_mla(args, dtype=torch.bfloat16)
    fp = mod.cache_bytes_per_token()
    assert fp.mla == (24 + 8) * 2
    assert fp.mha == 2 * 4 * 16 * 2
    assert fp.decompressed == 4 * (24 + 12) * 2

    bsz, n = 2, 17
    x = torch.randn(bsz, n, args.dim, dtype=torch.bfloat16)
    cache = mod.new_cache(bsz)
    mod(x, rope, cache=cache)
    assert isinstance(cache, MLACache) and cache.c_kv.dtype == torch.bfloat16
    assert cache.nbytes() == bsz * n * fp.mla
    # what an MHA-style cache of this layer's decompressed keys and values would hold
    with torch.no_grad():
        k_nope, v = mod.decompress(cache.c_kv)
        k = torch.cat([k_nope, cache.k_rope[:, :, None].expand(-1, -1, k_nope.shape[2], -1)], -1)
    assert k.nbytes + v.nbytes == bsz * n * fp.decompressed
    assert cache.nbytes() < k.nbytes + v.nbytes

    # sliding window: the cache stops growing at `window` tokens
    win, _ = make_mla(args.replace(sliding_window=5), dtype=torch.bfloat16)
    cache = win.new_cache(bsz)
    for t in range(n):
        win(x[:, t:t + 1], rope, cache=cache)
    assert cache.nbytes() == bsz * 5 * fp.mla

    # the 7B-style layer of DeepSeek-V2's Table 1 shape: latent 256 + rope 64 vs 2 * 32 heads * 128
    big = MultiHeadLatentAttention(FusionModelArgs(n_heads=32, kv_lora_rank=256, qk_rope_head_dim=64))
    fp = big.cache_bytes_per_token(torch.bfloat16)
    assert (fp.mla, fp.mha) == (640, 16384) and fp.ratio == pytest.approx(25.6)


def test_block_call_signature_still_works():
    from fusion_titan.model.blocks import FusionBlock

    args = small_args(n_routed_experts=0, ffn_hidden_dim=64, attn_backend="sdpa")
    block = FusionBlock("mla", args)
    block.init_weights(args)
    rope = rope_cache(args.qk_rope_head_dim, args.max_seq_len, args.rope_theta)
    out = block(torch.randn(2, 10, args.dim), rope)
    assert out.shape == (2, 10, args.dim) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# GPU


def _bf16_case(window, qk=192, v_dim=128, n_kv=8, q_len=256, docs=False):
    torch.manual_seed(0)
    q = torch.randn(2, 8, q_len, qk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, n_kv, 256, qk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, n_kv, 256, v_dim, device="cuda", dtype=torch.bfloat16)
    ids = doc_ids(2, 256).cuda() if docs else None
    return q, k, v, ids, qk ** -0.5


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 64])
def test_gpu_sdpa_cudnn_192_128_bf16(window):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _, scale = _bf16_case(window)
    ref = attn_ops.reference_attention(q, k, v, scale, window)
    out = causal_attention(q, k, v, scale=scale, window=window, backend="sdpa")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    if window == 0 and torch.cuda.get_device_capability()[0] >= 9:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):  # the 192/128 path really is cuDNN on Hopper
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("window,docs,n_kv,q_len", [(0, False, 8, 256), (64, False, 2, 256), (0, True, 8, 256), (64, True, 4, 256), (64, False, 8, 1)])
def test_gpu_flex_matches_reference(window, docs, n_kv, q_len):
    q, k, v, ids, scale = _bf16_case(window, n_kv=n_kv, q_len=q_len, docs=docs)
    ref = attn_ops.reference_attention(q, k, v, scale, window, ids)
    for backend in ("flex", "auto"):
        out = causal_attention(q, k, v, scale=scale, window=window, backend=backend, document_ids=ids)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="flash-attn not installed")
@pytest.mark.parametrize("window", [0, 64])
def test_gpu_flash_matches_reference(window):
    q, k, v, _, scale = _bf16_case(window, qk=128, v_dim=128)
    ref = attn_ops.reference_attention(q, k, v, scale, window)
    out = causal_attention(q, k, v, scale=scale, window=window, backend="flash")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_mla_decode_bf16():
    args = small_args(dim=256, n_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                      v_head_dim=64, sliding_window=16, attn_backend="auto")
    mod, rope = make_mla(args, n_kv_groups=4, dtype=torch.float32)
    mod, rope = mod.cuda().bfloat16(), rope.cuda()
    x = torch.randn(2, 40, args.dim, device="cuda", dtype=torch.bfloat16)
    full = mod(x, rope)
    cache = mod.new_cache(2)
    outs = [mod(x[:, :24], rope, cache=cache)] + [mod(x[:, t:t + 1], rope, cache=cache) for t in range(24, 40)]
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_compiled_mla_flex_matches_eager():
    """The training path: MLA compiled whole (mask built in-graph), flex vs the reference backend."""
    args = small_args(dim=256, n_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                      v_head_dim=64, sliding_window=48, attn_backend="flex", max_seq_len=256)
    mod, rope = make_mla(args, n_kv_groups=4, dtype=torch.float32)
    ref, _ = make_mla(args.replace(attn_backend="reference"), n_kv_groups=4, dtype=torch.float32)
    mod, ref, rope = mod.cuda().bfloat16(), ref.cuda().bfloat16(), rope.cuda()
    x = torch.randn(2, 256, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = doc_ids(2, 256).cuda()
    out = torch.compile(mod, fullgraph=True)(x, rope, document_ids=ids)
    expected = ref(x, rope, document_ids=ids)
    torch.testing.assert_close(out.float(), expected.float(), atol=5e-2, rtol=5e-2)
    (gx,) = torch.autograd.grad(out.float().square().sum(), x)
    (gr,) = torch.autograd.grad(expected.float().square().sum(), x)
    assert torch.nn.functional.cosine_similarity(gx.flatten().float(), gr.flatten().float(), dim=0) > 0.99

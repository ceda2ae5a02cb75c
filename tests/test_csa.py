"""Compressed sparse attention (`csa`): against a per-query loop written here from the design
(model/mixers/csa.py docstring), its block causality rule, decoding, documents and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.mixers import mixer_kind
from fusion_titan.model.mixers.csa import CompressedSparseAttention
from fusion_titan.model.model import FusionModel
from mixer_checks import (
    assert_causal, assert_prefill_in_pieces, assert_prefill_then_decode, rel_err, train_losses,
)


def csa_args(**changes):
    base = dict(vocab_size=256, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True,
                rope_fraction=0.5, attn_rope_theta=500.0, csa_stride=4, csa_window=5)
    return FLAVORS["debugmodel"].replace(**{**base, **changes})


def build_layer(seed=0, **changes):
    """A float64 layer whose every parameter is random (compressors and norms included)."""
    args = csa_args(**changes)
    torch.manual_seed(seed)
    layer = CompressedSparseAttention(args).double()
    layer.init_weights(0.02, 0.02)  # a float64 rope table
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0) + (1.0 if p.ndim == 1 else 0.0))
    return layer, args


# ----------------------------------------------------------------------------------------------
# the independent reference: one query, one head at a time


def rotate(vec, pos, rope_dim, theta):
    """Rotate-half RoPE of the first rope_dim dims of a [D] vector at integer position pos."""
    out = vec.clone()
    half = rope_dim // 2
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / rope_dim)
        a, b = vec[i], vec[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def rms(vec, norm):
    """RMSNorm of a [D] vector by the layer's norm module (None = qk_norm off)."""
    if norm is None:
        return vec
    return vec / torch.sqrt(vec.pow(2).mean() + norm.eps) * norm.weight


def softmax_read(q, keys, values, scale):
    if not keys:
        return torch.zeros_like(q)
    scores = torch.stack([q @ k for k in keys]) * scale
    return (scores.softmax(0)[:, None] * torch.stack(values)).sum(0)


def reference_csa(layer, args, x, document_ids=None):
    bsz, seqlen, _ = x.shape
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    s, W, r = layer.stride, layer.window, int(D * args.rope_fraction)
    theta, scale = args.attn_rope_theta, 1 / math.sqrt(D)
    qkv = layer.qkv
    q = (x @ qkv.wq.weight.T).view(bsz, seqlen, H, D)
    k = (x @ qkv.wk.weight.T).view(bsz, seqlen, Hkv, D)
    v = (x @ qkv.wv.weight.T).view(bsz, seqlen, Hkv, D)
    gate = torch.sigmoid(x @ layer.blend_gate.weight.T)
    doc = (lambda b, t: 0) if document_ids is None else (lambda b, t: int(document_ids[b, t]))
    out = []
    for b in range(bsz):
        rows = []
        for t in range(seqlen):
            heads = []
            for h in range(H):
                g = h // (H // Hkv)
                qv = rotate(rms(q[b, t, h], qkv.q_norm), t, r, theta)
                window = [j for j in range(max(0, t - W + 1), t + 1) if doc(b, j) == doc(b, t)]
                local = softmax_read(
                    qv, [rotate(rms(k[b, j, g], qkv.k_norm), j, r, theta) for j in window],
                    [v[b, j, g] for j in window], scale)
                keys, values = [], []
                for blk in range(seqlen // s):
                    last = (blk + 1) * s - 1
                    members = range(blk * s, last + 1)
                    if last > t or any(doc(b, j) != doc(b, t) for j in members):
                        continue
                    kc = layer.k_compressor.weight @ torch.cat([k[b, j, g] for j in members])
                    keys.append(rotate(rms(kc, qkv.k_norm), last, r, theta))
                    values.append(layer.v_compressor.weight @ torch.cat([v[b, j, g] for j in members]))
                distant = softmax_read(qv, keys, values, scale)
                heads.append(gate[b, t, h] * local + (1 - gate[b, t, h]) * distant)
            rows.append(torch.cat(heads) @ layer.wo.weight.T)
        out.append(torch.stack(rows))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# forward and gradients


@pytest.mark.parametrize("changes", [
    {}, dict(n_kv_heads=4), dict(n_kv_heads=1, csa_stride=3, csa_window=2), dict(rope_fraction=1.0),
    dict(qk_norm=False, rope_fraction=0.0), dict(csa_stride=1, csa_window=1),
])
def test_forward_matches_reference(changes):
    layer, args = build_layer(**changes)
    x = torch.randn(2, 14, args.dim, dtype=torch.float64)
    assert rel_err(layer(x), reference_csa(layer, args, x)) < 1e-12


def test_gradients_match_reference():
    layer, args = build_layer(csa_window=3)
    x = torch.randn(1, 11, args.dim, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 11, args.dim, dtype=torch.float64)
    params = [x] + list(layer.parameters())
    ours = torch.autograd.grad((layer(x) * weights).sum(), params)
    ref = torch.autograd.grad((reference_csa(layer, args, x) * weights).sum(), params)
    for (name, _), a, b in zip([("x", x)] + list(layer.named_parameters()), ours, ref):
        assert rel_err(a, b) < 1e-10, name


# ----------------------------------------------------------------------------------------------
# causality


def test_causal():
    layer, args = build_layer()
    assert_causal(layer, args.dim, seq_len=30)


def test_a_token_reaches_distant_queries_only_through_its_complete_block():
    # stride 8, window 2: token 8 (block 1 = tokens 8..15) reaches queries 8, 9 by the window,
    # then nothing until query 15 (the block's last token), where its summary becomes visible
    layer, args = build_layer(csa_stride=8, csa_window=2)
    x = torch.randn(1, 24, args.dim, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 8] += torch.randn(args.dim, dtype=torch.float64)
    changed = [not torch.equal(a, b) for a, b in zip(layer(x)[0], layer(x2)[0])]
    assert changed == [False] * 8 + [True, True] + [False] * 5 + [True] * 9


def test_decoded_token_sees_a_block_only_when_complete():
    # token by token: the compressed entries visible at each step are the complete blocks
    layer, args = build_layer(csa_stride=4, csa_window=1)
    cache = layer.new_cache(1)
    for t in range(10):
        layer(torch.randn(1, 1, args.dim, dtype=torch.float64), cache=cache)
        assert cache.n_blocks == (t + 1) // 4
        assert cache.partial_k.shape[2] == (t + 1) % 4
        assert cache.window_k.shape[2] == 1


# ----------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("prefill", [0, 1, 7, 13])
def test_prefill_then_decode_equals_full_forward(prefill):
    layer, args = build_layer()
    assert_prefill_then_decode(layer, layer.new_cache(2), args.dim, prefill)


@pytest.mark.parametrize("split", [3, 8, 17])
def test_prefill_in_pieces(split):
    layer, args = build_layer(csa_window=6)
    assert_prefill_in_pieces(layer, layer.new_cache(1), args.dim, seq_len=30, split=split)


# ----------------------------------------------------------------------------------------------
# documents


def test_document_ids_match_reference():
    layer, args = build_layer(csa_window=6)
    x = torch.randn(2, 16, args.dim, dtype=torch.float64)
    # row 0: a boundary inside block 1 (tokens 4..7 span documents 0 and 1); row 1: on a block edge
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 8 + [1] * 5 + [2] * 3])
    assert rel_err(layer(x, document_ids=docs), reference_csa(layer, args, x, docs)) < 1e-12
    # a document that starts on a block edge gives the same outputs alone as inside the packed row
    # (blocks are aligned to absolute positions: one starting mid-block loses that partial block)
    alone = layer(x[1:, 8:13])
    assert rel_err(layer(x, document_ids=docs)[1:, 8:13], alone) < 1e-12


def test_document_ids_with_a_cache_are_refused():
    layer, args = build_layer()
    x = torch.randn(1, 4, args.dim, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="document_ids cannot be combined"):
        layer(x, cache=layer.new_cache(1), document_ids=torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# construction, init, FLOPs


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="csa_stride >= 1"):
        CompressedSparseAttention(csa_args(csa_stride=0))
    with pytest.raises(ValueError, match="must divide n_heads"):
        CompressedSparseAttention(csa_args(n_kv_heads=3))
    with pytest.raises(ValueError, match="even number of rotated dims"):  # 16 * 0.3 = 4.8 dims
        CompressedSparseAttention(csa_args(rope_fraction=0.3))


def test_init_compresses_by_the_block_mean():
    args = csa_args()
    layer = CompressedSparseAttention(args).double()
    layer.init_weights(0.02, 0.01)
    block = torch.randn(3, 4 * args.head_dim, dtype=torch.float64)
    mean = block.view(3, 4, args.head_dim).mean(1)
    assert rel_err(layer.v_compressor(block), mean) < 1e-14


def test_flops_hand_count():
    args = csa_args(n_heads=9, head_dim=64, csa_window=64, csa_stride=4)
    seq = 1024
    # keys a query at t sees: min(t + 1, 64) in the window, (t + 1) // 4 complete blocks
    keys = sum(min(t + 1, 64) + (t + 1) // 4 for t in range(seq)) / seq
    assert keys == pytest.approx(62.03125 + 127.75)
    per_key = 2 * 9 * 64 + 2 * 9 * 64  # scores + weighted values, 2 FLOPs per multiply-add
    assert mixer_kind("csa").flops_per_token(args, seq) == pytest.approx(3 * per_key * keys)
    assert mixer_kind("csa").family == "attention"


# ----------------------------------------------------------------------------------------------
# in a model


def test_hybrid_pattern_model_trains():
    args = csa_args(layer_pattern="(gdn,gdn,csa,mla)*1", n_layers=4, max_seq_len=64, mtp_depth=0,
                    csa_window=8)
    args.validate()
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    assert [b.kind for b in model.layers.values()] == ["gdn", "gdn", "csa", "mla"]
    losses = train_losses(model, torch.randint(0, 256, (2, 48)))
    assert losses[-1] < losses[0] - 0.5, losses
    csa = model.layers["2"].mixer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in csa.parameters())


def test_model_decoding_through_csa_and_linear_blocks():
    from fusion_titan.model.decoding import new_model_cache

    args = csa_args(layer_pattern="csa,gdn,linear,mla", n_layers=4, max_seq_len=64, mtp_depth=0,
                    n_routed_experts=0)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    model = model.double().eval()
    tokens = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        full = model(tokens)
        cache = new_model_cache(model, 2)
        steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(6, 19)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-10


# ----------------------------------------------------------------------------------------------
# the GPU paths: bf16 eager and compiled (FlexAttention window + compressed blocks) vs float64 CPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flex", "sdpa"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_bf16_matches_float64(backend, compiled):
    """The float64 CPU layer equals the per-query reference (tests above); the GPU's bf16 forward
    and input gradient, eager and under torch.compile(fullgraph=True), must follow it."""
    layer, args = build_layer(n_heads=4, n_kv_heads=2, head_dim=64, dim=256, csa_window=64,
                              attn_backend=backend)
    with torch.no_grad():  # the test's random parameters at a scale where bf16 is well defined
        for p in layer.parameters():
            if p.ndim > 1:
                p.mul_(0.05)
    torch.manual_seed(1)
    x = torch.randn(2, 512, 256, dtype=torch.float64)
    ids = (torch.rand(2, 512) < 0.01).long().cumsum(-1)
    x_ref = x.clone().requires_grad_()
    want = layer(x_ref, document_ids=ids)
    want.pow(2).sum().backward()

    gpu = CompressedSparseAttention(args).cuda().bfloat16()
    gpu.load_state_dict(layer.state_dict())  # cast to bf16 by the copy
    gpu.rope.reset_table()  # the (non-persistent) rope table in float32
    run = torch.compile(gpu, fullgraph=True) if compiled else gpu
    x_gpu = x.cuda().bfloat16().requires_grad_()
    got = run(x_gpu, document_ids=ids.cuda())
    got.float().pow(2).sum().backward()
    assert rel_err(got.double().cpu(), want.detach()) < 3e-2
    assert rel_err(x_gpu.grad.double().cpu(), x_ref.grad) < 5e-2

"""The softmax-attention mixers `attn`, `swa`, `block_sparse` (fusion_titan/model/mixers/attn.py,
block_sparse.py; fusion_titan/ops/block_sparse_attention.py).

The reference here is written from the definitions: per batch row and per head, explicit
projections from the weight slices (GQA: query head h reads kv head h // (H / H_kv)), per-head
RMSNorm, the gates, partial RoPE computed from theta, and a float64 softmax over a mask spelled
out position by position. Forward and gradients are compared against it.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.mixers import MIXERS, mixer_kind
from fusion_titan.model.model import FusionModel
from mixer_checks import assert_causal, assert_prefill_in_pieces, assert_prefill_then_decode, rel_err

DIM = 32
KIND_ARGS = {
    "attn": {},
    "swa": {"attn_window": 5},
    "block_sparse": {"block_sparse_block": 3, "block_sparse_local": 2, "block_sparse_global": 2},
}


def small_args(**changes):
    base = dict(dim=DIM, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True, attn_gate="none",
                rope_fraction=1.0, attn_rope_theta=500.0, max_seq_len=64, attn_backend="auto")
    return FLAVORS["debugmodel"].replace(**{**base, **changes})


def make(kind: str, seed: int = 0, **changes):
    """The registered mixer in float64, initialised (norm weights randomised so they matter)."""
    args = small_args(**{**KIND_ARGS[kind], **changes})
    torch.manual_seed(seed)
    layer = mixer_kind(kind).build(args).double()
    layer.init_weights(0.2, 0.2)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return layer, args


# ----------------------------------------------------------------------------------------------
# the independent reference


def allowed(kind: str, args, i: int, j: int) -> bool:
    """May the query at position i attend the key at position j?"""
    if j > i:
        return False
    if kind == "swa":
        return i - j < args.attn_window
    if kind == "block_sparse":
        b = args.block_sparse_block
        return i // b - j // b < args.block_sparse_local or j < args.block_sparse_global
    return True


def mask_of(kind, args, seq_len, document_ids=None):
    """[B or 1, T, T] boolean, spelled out one (i, j) at a time."""
    rows = 1 if document_ids is None else document_ids.shape[0]
    mask = torch.zeros(rows, seq_len, seq_len, dtype=torch.bool)
    for b in range(rows):
        for i in range(seq_len):
            for j in range(seq_len):
                same_doc = document_ids is None or bool(document_ids[b, i] == document_ids[b, j])
                mask[b, i, j] = allowed(kind, args, i, j) and same_doc
    return mask


def partial_rope(x, rope_dim, theta):
    """x [T, D]: rotate-half RoPE on the first rope_dim dims at positions 0..T-1, float64."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[:, :half], x[:, half:rope_dim]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[:, rope_dim:]], dim=-1)


def reference(layer, args, x, mask):
    """The mixer by hand: loops over batch rows and heads; mask [B or 1, T, T]."""
    n_heads, head_dim = args.n_heads, args.head_dim
    n_kv = args.n_kv_heads or n_heads
    rope_dim = int(args.rope_fraction * head_dim)
    wq, wk, wv = layer.qkv.wq.weight, layer.qkv.wk.weight, layer.qkv.wv.weight
    eps = args.norm_eps

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    rows = []
    for b in range(x.shape[0]):
        heads = []
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            sl_q, sl_kv = slice(h * head_dim, (h + 1) * head_dim), slice(g * head_dim, (g + 1) * head_dim)
            q, k, v = x[b] @ wq[sl_q].T, x[b] @ wk[sl_kv].T, x[b] @ wv[sl_kv].T
            if args.qk_norm:
                q, k = rms(q, layer.qkv.q_norm.weight), rms(k, layer.qkv.k_norm.weight)
            gate = torch.sigmoid(x[b] @ layer.w_gate.weight[sl_q].T) if args.attn_gate != "none" else None
            if args.attn_gate == "query":
                q = q * gate
            q, k = partial_rope(q, rope_dim, args.attn_rope_theta), partial_rope(k, rope_dim, args.attn_rope_theta)
            scores = (q @ k.T) / math.sqrt(head_dim)
            scores = scores.masked_fill(~mask[min(b, mask.shape[0] - 1)], float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
            if args.attn_gate == "output":
                out = out * gate
            heads.append(out)
        rows.append(torch.cat(heads, dim=-1) @ layer.wo.weight.T)
    return torch.stack(rows)


def compare_with_reference(layer, args, kind, seq_len=14, document_ids=None):
    """Forward and every gradient (input and parameters) against the reference."""
    x = torch.randn(2, seq_len, DIM, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, seq_len, DIM, dtype=torch.float64)
    params = [x, *layer.parameters()]
    out = layer(x, document_ids=document_ids)
    ours = torch.autograd.grad((out * probe).sum(), params)
    expected = reference(layer, args, x, mask_of(kind, args, seq_len, document_ids))
    theirs = torch.autograd.grad((expected * probe).sum(), params)
    assert rel_err(out, expected) < 1e-10
    for name, a, b in zip(["x", *(n for n, _ in layer.named_parameters())], ours, theirs):
        assert rel_err(a, b) < 1e-9, name


# ----------------------------------------------------------------------------------------------
# forward / backward against the reference


@pytest.mark.parametrize("rope_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("gate", ["none", "output", "query"])
@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_matches_reference(kind, gate, rope_fraction):
    layer, args = make(kind, attn_gate=gate, rope_fraction=rope_fraction)
    compare_with_reference(layer, args, kind)


@pytest.mark.parametrize("n_kv_heads,qk_norm", [(0, False), (4, True), (2, False), (1, True)])
def test_heads_and_qk_norm_match_reference(n_kv_heads, qk_norm):
    """MHA (0 = n_heads, and explicitly 4), GQA 2:1 and MQA; with and without QK-norm."""
    layer, args = make("attn", n_kv_heads=n_kv_heads, qk_norm=qk_norm, attn_gate="output", rope_fraction=0.5)
    assert layer.qkv.wk.weight.shape[0] == (n_kv_heads or 4) * 8
    assert (layer.qkv.q_norm is not None) == qk_norm
    compare_with_reference(layer, args, "attn")


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex", "auto"])
@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_document_masks_on_every_backend(kind, backend):
    ids = torch.tensor([[0] * 4 + [1] * 7 + [2] * 5, [0] * 9 + [1] * 7])
    layer, args = make(kind, attn_backend=backend, attn_gate="query")
    compare_with_reference(layer, args, kind, seq_len=16, document_ids=ids)
    # without autograd "flex" really runs FlexAttention on CPU (with it, SDPA stands in)
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x, document_ids=ids)
        assert rel_err(out, reference(layer, args, x, mask_of(kind, args, 16, ids))) < 1e-10


def test_flash_backend_refuses_block_sparse():
    layer, _ = make("block_sparse", attn_backend="flash")
    with pytest.raises(NotImplementedError, match="block_sparse mask"):
        layer(torch.randn(1, 6, DIM, dtype=torch.float64))


def test_rope_fraction_zero_ignores_positions():
    """Without RoPE the last token's output does not depend on the order of the tokens before it;
    with any rotated dims it does (the reference test pins down how)."""
    x = torch.randn(1, 8, DIM, dtype=torch.float64)
    shuffled = torch.cat([x[:, torch.randperm(7)], x[:, 7:]], dim=1)
    for fraction, position_free in ((0.0, True), (0.5, False), (1.0, False)):
        layer, _ = make("attn", rope_fraction=fraction)
        assert layer.rope.rope_dim == int(8 * fraction)
        same = torch.allclose(layer(x)[:, -1], layer(shuffled)[:, -1], rtol=1e-12, atol=1e-12)
        assert same == position_free, fraction


# ----------------------------------------------------------------------------------------------
# causality and decoding


@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_causal(kind):
    layer, _ = make(kind, attn_gate="output", rope_fraction=0.5)
    assert_causal(layer, DIM)


@pytest.mark.parametrize("gate", ["none", "output", "query"])
@pytest.mark.parametrize("prefill", [0, 5, 13])
@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_prefill_then_decode(kind, prefill, gate):
    layer, args = make(kind, attn_gate=gate, rope_fraction=0.5)
    cache = layer.new_cache(2)
    assert_prefill_then_decode(layer, cache, DIM, prefill)
    assert cache.length == 24
    kept = args.attn_window if kind == "swa" else 24  # swa keeps only its window
    assert cache.k.shape == (2, 2, kept, 8) and cache.v.shape == (2, 2, kept, 8)


@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_prefill_in_pieces(kind):
    layer, _ = make(kind, attn_gate="query")
    assert_prefill_in_pieces(layer, layer.new_cache(1), DIM, seq_len=20, split=11)


def test_decoding_with_documents_is_refused():
    layer, _ = make("attn")
    with pytest.raises(NotImplementedError, match="decoding cache"):
        layer(torch.randn(1, 4, DIM, dtype=torch.float64), cache=layer.new_cache(1),
              document_ids=torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# configuration errors


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="attn_window > 0"):
        make("swa", attn_window=0)
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        make("attn", n_kv_heads=3)
    with pytest.raises(ValueError, match="even number of rotated dims"):
        make("attn", rope_fraction=0.3)
    with pytest.raises(ValueError, match="attn_gate 'sigmoid' must be one of"):
        make("attn", attn_gate="sigmoid")
    with pytest.raises(ValueError, match="block_sparse_block must be >= 1"):
        make("block_sparse", block_sparse_block=0)


# ----------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_by_hand():
    args = small_args(attn_window=3, block_sparse_block=2, block_sparse_local=2, block_sparse_global=1)
    per_key = 3 * 2 * args.n_heads * (args.head_dim + args.head_dim)  # q.k and p.v, fwd + bwd
    # causal, 4 tokens: 1 + 2 + 3 + 4 keys
    assert MIXERS["attn"].flops_per_token(args, 4) == per_key * 10 / 4
    # window 3, 6 tokens: 1 + 2 + 3 + 3 + 3 + 3
    assert MIXERS["swa"].flops_per_token(args, 6) == per_key * 15 / 6
    # blocks of 2, own + previous block, token 0 global, 8 tokens:
    # t0 {0}, t1 {0,1}, t2 {0..2}, t3 {0..3}, t4 {2,3,4}+{0}, t5 {2..5}+{0}, t6 {4,5,6}+{0}, t7 {4..7}+{0}
    assert MIXERS["block_sparse"].flops_per_token(args, 8) == per_key * (1 + 2 + 3 + 4 + 4 + 5 + 4 + 5) / 8


@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_flops_count_the_keys_of_the_mask(kind):
    args = small_args(**KIND_ARGS[kind])
    seen = mask_of(kind, args, 40).sum().item() / 40
    assert MIXERS[kind].flops_per_token(args, 40) == pytest.approx(3 * 4 * args.n_heads * args.head_dim * seen)


# ----------------------------------------------------------------------------------------------
# whole models


PATTERN = "attn,swa,block_sparse,mla,gdn,attn+dense"


def hybrid(**changes):
    args = FLAVORS["debugmodel"].replace(
        vocab_size=256, layer_pattern=PATTERN, max_seq_len=64, head_dim=32, n_kv_heads=2,
        qk_norm=True, attn_gate="output", rope_fraction=0.5, attn_window=6, block_sparse_block=4,
        block_sparse_local=2, block_sparse_global=2, mtp_depth=0, **changes)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    return model


def test_mixed_pattern_trains():
    model = hybrid()
    assert [b.kind for b in model.layers.values()] == PATTERN.replace("+dense", "").split(",")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(12):
        loss = model(x, labels=y)["ce_sum"] / y.numel()
        loss.backward()
        if not losses:  # every mixer learns
            for block in model.layers.values():
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.mixer.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_mixed_pattern_decodes_like_the_full_forward():
    from fusion_titan.model.decoding import new_model_cache

    model = hybrid().double().eval()
    tokens = torch.randint(0, 256, (2, 20))
    full = model(tokens)
    cache = new_model_cache(model, 2)
    steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(9, 20)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-9


def test_meta_build_recomputes_the_rope_table():
    args = hybrid().model_args
    with torch.device("meta"):
        model = FusionModel(args)
    model.to_empty(device="cpu")
    model.init_weights()
    for kind in ("attn", "swa", "block_sparse"):
        mixer = next(b.mixer for b in model.layers.values() if b.kind == kind)
        fresh = type(mixer.rope)(args.head_dim, args.rope_fraction, args.attn_rope_theta, args.max_seq_len)
        assert torch.equal(mixer.rope.table, fresh.table)


# ----------------------------------------------------------------------------------------------
# muP


def test_mup_base_scales_kv_heads_with_heads():
    args = FLAVORS["dense_0p6b"]
    base = args.mup_base()
    assert (base.n_heads, base.n_kv_heads) == (4, 2)  # 16 / 8 heads at dim 1024, base dim 256
    assert base.head_dim == args.head_dim
    odd = args.replace(n_heads=12, n_kv_heads=4, dim=768).mup_base()  # 4 heads, 1.33 -> 1 kv head
    assert odd.n_heads % odd.n_kv_heads == 0


@pytest.mark.parametrize("width", [64, 256])
def test_mup_init_follows_each_fan_in(width):
    """test_mup's per-weight rule on a model with attention mixers (GQA, QK-norm, gate)."""
    from test_mup import expected_std, hybrid_args

    args = hybrid_args(width, layer_pattern="attn,swa", n_kv_heads=width // 64, head_dim=16,
                       qk_norm=True, attn_gate="output", attn_window=8, mtp_depth=0)
    assert args.mup_base().n_kv_heads == 1
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    names = set()
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            tolerance = 0.02 + 4 / math.sqrt(2 * p.numel())
            assert p.std().item() == pytest.approx(expected_std(name, args), rel=tolerance), name
            names.add(name.split(".")[-2])
    assert {"wq", "wk", "wv", "w_gate", "wo"} <= names


def test_mup_coordinates_stay_flat_with_attention():
    """test_mup's coordinate check (AdamW) with the MLA block replaced by a gated GQA `attn` block."""
    from test_mup import WIDTHS, coordinates, optimizer_config, spreads

    cfg = optimizer_config("AdamW")
    changes = lambda w: {"layer_pattern": "attn,gdn", "n_kv_heads": w // 64, "head_dim": 16,  # noqa: E731
                         "qk_norm": True, "attn_gate": "output"}
    runs = [coordinates(w, True, cfg, **changes(w)) for w in WIDTHS]
    spread = spreads(runs)
    assert max(spread.values()) < 1.7, (spread, runs)
    standard = spreads([coordinates(w, False, cfg, **changes(w)) for w in WIDTHS[::2]])
    assert max(standard.values()) > 2.5, standard


# ----------------------------------------------------------------------------------------------
# flavors


def meta_model(name):
    with torch.device("meta"):
        return FusionModel(FLAVORS[name])


def test_0p6b_flavors_build_on_meta_at_matched_active_params():
    from fusion_titan.model.flops import count_params

    counts = {}
    for name in ("dense_0p6b", "moe_0p6b"):
        model = meta_model(name)
        assert FLAVORS[name].block_kinds() == ["attn"] * 28 and len(model.mtp) == 0
        mixer = model.layers["0"].mixer
        assert mixer.qkv.wq.weight.shape == (16 * 128, 1024) and mixer.qkv.wk.weight.shape == (8 * 128, 1024)
        assert mixer.qkv.q_norm is not None
        counts[name] = count_params(model, FLAVORS[name])
    dense, moe = counts["dense_0p6b"], counts["moe_0p6b"]
    assert dense.total == dense.active and 0.55e9 < dense.total < 0.65e9  # Qwen3-0.6B, Qwen2.5 vocab
    assert moe.active == pytest.approx(dense.active, rel=0.02) and moe.total > 3 * moe.active


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense_0p6b", "moe_0p6b"])
def test_0p6b_config_trains_at_debug_size(name, tmp_path):
    """train_configs/<name>.toml through run_train.sh on CPU, with the flavor's debug size."""
    from trainer_runs import QUICK, launch, tb_losses

    launch(tmp_path, *QUICK, "--model.flavor", f"{name}_debug", "--training.steps", "30",
           "--training.local_batch_size", "2", "--training.mixed_precision_param", "float32",
           "--compile.no-enable", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "5",
           config=f"train_configs/{name}.toml", timeout=1500)
    losses = tb_losses(tmp_path)
    assert sorted(losses) == list(range(1, 31))
    early = sum(losses[s] for s in range(1, 6)) / 5
    late = sum(losses[s] for s in range(26, 31)) / 5
    assert late < early - 1.5, (early, late)


# ----------------------------------------------------------------------------------------------
# GPU fast paths (run on the device)


def _gpu_layer(kind, backend, **changes):
    args = small_args(dim=256, n_heads=8, n_kv_heads=2, head_dim=64, max_seq_len=512, attn_backend=backend,
                      attn_gate="output", rope_fraction=0.5, attn_window=96, block_sparse_block=128,
                      block_sparse_local=2, block_sparse_global=64, **changes)
    torch.manual_seed(0)
    layer = mixer_kind(kind).build(args).cuda()
    layer.init_weights(0.05, 0.05)
    return layer


@pytest.mark.gpu
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("backend", ["flex", "sdpa", "auto"])
@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_gpu_fast_paths_match_reference_bf16(kind, backend, docs):
    fast = _gpu_layer(kind, backend)
    ref = _gpu_layer(kind, "reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 512, 256, device="cuda")
    ids = None
    if docs:
        ids = (torch.rand(2, 512, device="cuda") < 0.01).long().cumsum(-1)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast(xb, document_ids=ids)
    out.float().pow(2).sum().backward()
    xr = x.clone().requires_grad_()
    expected = ref(xr, document_ids=ids)  # float32 reference
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    assert rel_err(xb.grad.float(), xr.grad) < 5e-2
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(p.grad.float(), q.grad) < 5e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["attn", "swa", "block_sparse"])
def test_gpu_decode_bf16(kind):
    layer = _gpu_layer(kind, "auto").bfloat16()
    layer.rope.reset_table()  # float32 table
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    full = layer(x)
    cache = layer.new_cache(2)
    outs = [layer(x[:, :200], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(200, 300)]
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_block_sparse_mask_skips_tiles():
    from fusion_titan.ops.block_sparse_attention import block_sparse_block_mask

    mask = block_sparse_block_mask(4096, 4096, 128, 4, 128, "cuda")
    # 32 query tiles; each sees at most its 4 local tiles + the global tile: far below causal's 528
    full = 0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum().item()
    assert 0 < mask.kv_num_blocks.sum().item() + full <= 32 * 5


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["swa", "block_sparse"])
def test_gpu_compiled_flex_matches_reference(kind):
    """The training path: the mixer compiled whole (BlockMask built in-graph), flex vs reference."""
    fast = _gpu_layer(kind, "flex").bfloat16()
    ref = _gpu_layer(kind, "reference").bfloat16()
    ref.load_state_dict(fast.state_dict())
    fast.rope.reset_table(), ref.rope.reset_table()
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)
    ids = (torch.rand(2, 512, device="cuda") < 0.01).long().cumsum(-1)
    out = torch.compile(fast, fullgraph=True)(x, document_ids=ids)
    torch.testing.assert_close(out.float(), ref(x, document_ids=ids).float(), atol=3e-2, rtol=3e-2)

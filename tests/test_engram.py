"""`[model] engram_layers`: hashed n-gram memory (model/engram.py).

The hash is checked against Python-integer arithmetic, the lookup is causal (pad before the
sequence start, no reach into an earlier document), prefill + decode equals the full forward,
and the tables get their own optimizer group.
"""

import math

import pytest
import torch

from fusion_titan.model.decoding import new_model_cache
from fusion_titan.model.engram import PAD_ID, Engram
from fusion_titan.training.optimizer import _optimizer_factory
from test_optimizer_builder import config
from tiny_models import tiny_model

ENGRAM = dict(engram_layers=[1, 4], engram_ngram=3, engram_table_size=97, engram_dim=16, engram_heads=2)
VOCAB = 256


def ids(batch=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference_rows(engram: Engram, row: list[int], t: int) -> list[int]:
    """Table rows of position t, from Python ints: for order n and head j,
    XOR_k (x_{t-k} * m[n][j][k]) mod p + offset, with x before the start = PAD_ID."""
    h = engram.hasher
    x = lambda i: row[i] if i >= 0 else PAD_ID  # noqa: E731
    out = []
    for order in range(2, h.ngram + 1):
        for head in range(h.heads):
            i = (order - 2) * h.heads + head
            mix = 0
            for k in range(order):
                mix ^= x(t - k) * h.multipliers[order - 2][head][k]
            out.append(mix % h.moduli[i] + h.offsets[i])
    return out


def test_hash_matches_python_integer_arithmetic():
    model = tiny_model(**ENGRAM)
    engram = model.engrams["1"]
    x = ids()
    rows = engram.hasher(engram.shifted_ids(x))
    assert rows.shape == (2, 12, 2 * 2)
    for b in range(2):
        for t in range(12):
            assert rows[b, t].tolist() == reference_rows(engram, x[b].tolist(), t)
    h = engram.hasher
    assert len(set(h.moduli)) == len(h.moduli) and min(h.moduli) >= 97
    assert all(m % 2 == 1 for per_order in h.multipliers for per_head in per_order for m in per_head)
    assert all(all(p % d for d in range(2, math.isqrt(p) + 1)) for p in h.moduli)  # primes
    other = model.engrams["4"].hasher  # each layer hashes with its own multipliers
    assert other.multipliers != h.multipliers


def test_lookup_is_causal():
    model = tiny_model(**ENGRAM)
    x = ids()
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(y)
    # (the chunked kernels reorder sums when later tokens change: rounding only)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-13)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=(0, 2)).min() > 1e-6
    engram = model.engrams["1"]
    ra, rb = (engram.hasher(engram.shifted_ids(t)) for t in (x, y))
    assert torch.equal(ra[:, :6], rb[:, :6]) and torch.equal(ra[:, 9:], rb[:, 9:])
    assert (ra[:, 6:8] != rb[:, 6:8]).all()  # positions 6, 7: token 6 is in their 2- and 3-grams
    assert torch.equal(ra[:, 8, :2], rb[:, 8, :2]) and (ra[:, 8, 2:] != rb[:, 8, 2:]).all()  # 3-gram only


def test_ngrams_stop_at_document_boundaries():
    model = tiny_model(**ENGRAM)
    engram = model.engrams["1"]
    x = ids(batch=1)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    rows = engram.hasher(engram.shifted_ids(x, document_ids=docs))
    alone = engram.hasher(engram.shifted_ids(x[:, 5:]))  # the second document as its own sequence
    assert torch.equal(rows[:, 5:], alone)
    assert torch.equal(rows[:, :5], engram.hasher(engram.shifted_ids(x[:, :5])))


@pytest.mark.parametrize("extra", [{}, dict(residual="hyper", hyper_streams=2)], ids=["plain", "hyper"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 1, 4], [2, 10]], ids=["k1", "k5", "k2"])
def test_prefill_then_decode_matches_full_forward(extra, chunks):
    model = tiny_model(**ENGRAM, **extra)
    x = ids()
    with torch.no_grad():
        full = model(x)
        cache = new_model_cache(model, 2)
        pieces, pos = [], 0
        for n in chunks:
            pieces.append(model(x[:, pos:pos + n], cache=cache))
            pos += n
            assert torch.equal(cache.token_history, x[:, max(0, pos - 2):pos])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


def test_gate_and_value_follow_the_formula():
    """h + sigmoid(<RMSNorm(h), RMSNorm(W_k e)> / sqrt(D)) * W_v e, e = the heads' rows concatenated."""
    model = tiny_model(**ENGRAM)
    engram = model.engrams["1"]
    x = ids()
    h = torch.randn(2, 12, model.model_args.dim, dtype=torch.float64)
    rows = torch.tensor([[reference_rows(engram, x[b].tolist(), t) for t in range(12)] for b in range(2)])
    e = engram.table.weight[rows].flatten(-2)
    norm = lambda v, w: v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    gate = torch.sigmoid((norm(h, engram.query_norm.weight) * norm(e @ engram.key_proj.weight.T, engram.key_norm.weight)).sum(-1, keepdim=True) / math.sqrt(h.shape[-1]))
    want = h + gate * (e @ engram.value_proj.weight.T)
    torch.testing.assert_close(engram(h, x), want, rtol=1e-10, atol=1e-12)


def test_tables_get_their_own_adam_group():
    model = tiny_model(**ENGRAM).float().train()
    cfg = config()
    cfg.engram_lr = 5e-3
    opt = _optimizer_factory(cfg)(model)
    group = next(g for g in opt.param_groups if g["name"] == "engram")
    tables = [model.engrams[k].table.weight for k in ("1", "4")]
    assert {id(p) for p in group["params"]} == {id(p) for p in tables}
    assert group["lr"] == 5e-3 and group["weight_decay"] == 0.0 and group["rule"] == "adamw"
    rule_of = {id(p): g["rule"] for g in opt.param_groups for p in g["params"]}
    assert rule_of[id(model.engrams["1"].value_proj.weight)] == "normuon"
    before = [t.detach().clone() for t in tables]
    out = model(ids(), labels=ids())
    (out["ce_sum"] + out["mtp_sums"].sum()).backward()
    opt.step()
    assert all((t != b).any() for t, b in zip(tables, before))


def test_engram_model_trains_with_the_plain_residual_and_refuses_hf_export(tmp_path):
    """torchtitan builds the state-dict adapter for every run: an Engram model must get past it
    (its training works) while a Hugging Face conversion says why it cannot be done."""
    from fusion_titan.checkpoint.state_dict_adapter import FusionStateDictAdapter, write_config
    from fusion_titan.model.flavors import FLAVORS

    args = FLAVORS["debugmodel"].replace(engram_layers=[1], engram_table_size=64, engram_dim=16,
                                         engram_heads=2)
    adapter = FusionStateDictAdapter(args)  # what the Trainer does at start-up
    with pytest.raises(ValueError, match="Engram memory"):
        adapter.to_hf({})
    with pytest.raises(ValueError, match="Engram memory"):
        write_config(args, str(tmp_path))

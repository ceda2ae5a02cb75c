"""Prefill + cached decoding of the whole hybrid == the full-sequence forward (CPU, float64)."""

import pytest
import torch

from fusion_titan.model.decoding import (
    ModelCache, cache_nbytes, greedy_generate, layer_nbytes, new_model_cache,
)
from fusion_titan.model.mixers.gdn import GDNCache
from fusion_titan.model.mixers.mamba2 import Mamba2Cache
from fusion_titan.model.mixers.mla import MLACache
from tiny_models import tiny_model

SEQ = 12
WINDOW = 4  # < SEQ, so the MLA caches get trimmed

CONFIGS = {
    "5:1": dict(layer_schedule="5:1"),  # MLA + MoE blocks and one Gated DeltaNet block
    "ssm-mamba2": dict(layer_schedule="ssm", ssm_type="mamba2", mamba_head_dim=32, mamba_d_state=32),
    "mha-window": dict(layer_schedule="mha", sliding_window=WINDOW),
}


def build(name, seed=0):
    return tiny_model(seed, **CONFIGS[name])


def tokens_for(model, batch=2, seq=SEQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.model_args.vocab_size, (batch, seq), generator=g)


def decode_in_chunks(model, tokens, chunks):
    cache = new_model_cache(model, tokens.shape[0])
    out, pos = [], 0
    for n in chunks:
        out.append(model(tokens[:, pos:pos + n], cache=cache))
        pos += n
        assert cache.position == pos
    assert pos == tokens.shape[1]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunks", [
    [1] * SEQ,                  # prefill 1, then token by token
    [5] + [1] * (SEQ - 5),      # prefill 5, then token by token
    [5, 4, 3],                  # multi-token chunks after the prefill
], ids=["k1", "k5", "chunks"])
def test_prefill_then_decode_matches_full_forward(name, chunks):
    model = build(name)
    tokens = tokens_for(model)
    with torch.no_grad():
        full = model(tokens)
        cached, cache = decode_in_chunks(model, tokens, chunks)
    assert cached.shape == full.shape == (2, SEQ, model.model_args.vocab_size)
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)
    kinds = {"5:1": (MLACache, GDNCache), "ssm-mamba2": (Mamba2Cache,), "mha-window": (MLACache,)}
    assert {type(c) for c in cache.layers} == set(kinds[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_matches_recomputed_argmax(name):
    model = build(name)
    prompt = tokens_for(model, batch=2, seq=3)
    n_new = 6
    with torch.no_grad():
        ref = prompt
        for _ in range(n_new):
            nxt = model(ref)[:, -1].argmax(dim=-1, keepdim=True)
            ref = torch.cat([ref, nxt], dim=1)
    out = greedy_generate(model, prompt, n_new)
    assert out.shape == (2, 3 + n_new)
    assert torch.equal(out, ref)
    # 1-D prompts and n_new = 0
    assert torch.equal(greedy_generate(model, prompt[0], n_new), ref[0])
    assert torch.equal(greedy_generate(model, prompt, 0), prompt)


def test_greedy_generate_restores_training_mode():
    model = build("ssm-mamba2").train()
    greedy_generate(model, tokens_for(model, batch=1, seq=2), 2)
    assert model.training


def test_cache_nbytes_growth_5to1():
    model = build("5:1")
    args = model.model_args
    batch, prefill = 2, 5
    tokens = tokens_for(model, batch=batch)
    kinds = [layer.kind for layer in model.layers.values()]
    n_mla = kinds.count("mla")
    assert n_mla == 5 and kinds.count("gdn") == 1
    per_token = batch * (args.kv_lora_rank + args.qk_rope_head_dim) * 8  # float64, per MLA layer
    assert model.layers["0"].mixer.cache_bytes_per_token().mla * batch == per_token

    cache = new_model_cache(model, batch)
    assert cache_nbytes(cache) == 0
    with torch.no_grad():
        model(tokens[:, :prefill], cache=cache)
        before = layer_nbytes(cache)
        for t in range(prefill, SEQ):
            model(tokens[:, t:t + 1], cache=cache)
            now = layer_nbytes(cache)
            for kind, b, n in zip(kinds, before, now):
                assert n - b == (per_token if kind == "mla" else 0)
            before = now
    assert cache_nbytes(cache) == sum(before)
    for kind, layer_cache, n in zip(kinds, cache.layers, before):
        if kind == "mla":
            assert n == SEQ * per_token == layer_cache.nbytes()
        else:
            assert n > 0  # conv states + delta-rule state, constant in the sequence length


def test_cache_nbytes_window_and_ssm_constant():
    model = build("mha-window")
    args = model.model_args
    per_token = (args.kv_lora_rank + args.qk_rope_head_dim) * 8
    tokens = tokens_for(model, batch=1)
    cache = new_model_cache(model, 1)
    with torch.no_grad():
        for t in range(SEQ):
            model(tokens[:, t:t + 1], cache=cache)
            assert cache_nbytes(cache) == args.n_layers * min(t + 1, WINDOW) * per_token

    model = build("ssm-mamba2")
    cache = new_model_cache(model, 1)
    sizes = []
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        for t in range(5, SEQ):
            model(tokens[:, t:t + 1], cache=cache)
            sizes.append(cache_nbytes(cache))
    assert len(set(sizes)) == 1 and sizes[0] > 0


def test_cache_misuse_raises():
    model = build("5:1")
    tokens = tokens_for(model)
    cache = new_model_cache(model, 2)
    with pytest.raises(ValueError, match="labels"):
        model(tokens, labels=tokens, cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(tokens[:1], cache=cache)
    with pytest.raises(ValueError, match="layer caches"):
        model(tokens, cache=ModelCache(layers=cache.layers[:2], batch_size=2))
    assert cache.position == 0 and cache_nbytes(cache) == 0

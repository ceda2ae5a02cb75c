"""Linear-attention baseline (`linear`): the chunked op and the layer against the recurrence
o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), written here token by token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.mixers import mixer_kind
from fusion_titan.model.mixers.linear import LinearAttention
from fusion_titan.model.model import FusionModel
from fusion_titan.ops.linear_attention import chunked_linear_attention, linear_attention_recurrent
from mixer_checks import assert_causal, assert_prefill_in_pieces, assert_prefill_then_decode, rel_err, train_losses

EPS = 1e-6


def recurrence(q, k, v, document_ids=None, state=None):
    """Token by token, one head at a time; the state restarts where the document changes."""
    bsz, seqlen, heads, k_dim = q.shape
    out = torch.zeros(bsz, seqlen, heads, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            s = torch.zeros(k_dim, v.shape[-1], dtype=torch.float64) if state is None else state[0][b, h]
            z = torch.zeros(k_dim, dtype=torch.float64) if state is None else state[1][b, h]
            for t in range(seqlen):
                if document_ids is not None and t > 0 and document_ids[b, t] != document_ids[b, t - 1]:
                    s, z = torch.zeros_like(s), torch.zeros_like(z)
                s = s + torch.outer(k[b, t, h], v[b, t, h])
                z = z + k[b, t, h]
                out[b, t, h] = (q[b, t, h] @ s) / (q[b, t, h] @ z + EPS)
    return out


def positive(*shape):
    return F.elu(torch.randn(*shape, dtype=torch.float64)) + 1


# ----------------------------------------------------------------------------------------------
# the op


@pytest.mark.parametrize("seqlen, chunk", [(1, 4), (13, 4), (16, 4), (37, 8), (40, 64)])
def test_chunked_matches_recurrence(seqlen, chunk):
    q, k = positive(2, seqlen, 3, 5), positive(2, seqlen, 3, 5)
    v = torch.randn(2, seqlen, 3, 7, dtype=torch.float64)
    out, (s, z) = chunked_linear_attention(q, k, v, EPS, chunk_size=chunk)
    assert rel_err(out, recurrence(q, k, v)) < 1e-12
    assert rel_err(s, torch.einsum("bthk,bthv->bhkv", k, v)) < 1e-12
    assert rel_err(z, k.sum(1)) < 1e-12
    ops_ref, _ = linear_attention_recurrent(q, k, v, EPS)  # the op's own token-by-token form
    assert rel_err(ops_ref, out) < 1e-12


def test_chunked_gradients_match_recurrence():
    q, k = positive(1, 11, 2, 4).requires_grad_(), positive(1, 11, 2, 4).requires_grad_()
    v = torch.randn(1, 11, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 11, 2, 3, dtype=torch.float64)
    ours = torch.autograd.grad((chunked_linear_attention(q, k, v, EPS, chunk_size=4)[0] * w).sum(), (q, k, v))
    ref = torch.autograd.grad((recurrence(q, k, v) * w).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-11


def test_initial_state_continues_the_sequence():
    q, k = positive(2, 20, 2, 4), positive(2, 20, 2, 4)
    v = torch.randn(2, 20, 2, 3, dtype=torch.float64)
    _, state = chunked_linear_attention(q[:, :9], k[:, :9], v[:, :9], EPS, chunk_size=4)
    tail, _ = chunked_linear_attention(q[:, 9:], k[:, 9:], v[:, 9:], EPS, chunk_size=4, initial_state=state)
    assert rel_err(tail, recurrence(q, k, v)[:, 9:]) < 1e-12


@pytest.mark.parametrize("chunk", [4, 8])
def test_documents_restart_the_state(chunk):
    seqlen = 22
    q, k = positive(2, seqlen, 2, 4), positive(2, seqlen, 2, 4)
    v = torch.randn(2, seqlen, 2, 3, dtype=torch.float64)
    # boundaries inside chunks, on a chunk edge, and a document spanning several chunks
    docs = torch.tensor([[0] * 3 + [1] * 9 + [2] * 1 + [3] * 9, [0] * 8 + [1] * 14])
    out, _ = chunked_linear_attention(q, k, v, EPS, chunk_size=chunk, document_ids=docs)
    assert rel_err(out, recurrence(q, k, v, docs)) < 1e-12


def test_documents_with_a_state_are_refused():
    q = positive(1, 4, 1, 2)
    state = (torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="document_ids cannot be combined"):
        chunked_linear_attention(q, q, q, EPS, initial_state=state, document_ids=torch.zeros(1, 4))


# ----------------------------------------------------------------------------------------------
# the layer


def linear_args(**changes):
    return FLAVORS["debugmodel"].replace(**{**dict(vocab_size=256, n_heads=3, head_dim=8), **changes})


def build_layer(seed=0, **changes):
    args = linear_args(**changes)
    torch.manual_seed(seed)
    layer = LinearAttention(args).double()
    layer.init_weights(0.2, 0.2)
    return layer, args


@pytest.mark.parametrize("feature_map, phi", [("elu", lambda x: F.elu(x) + 1), ("relu", F.relu)])
def test_layer_matches_recurrence(feature_map, phi):
    layer, args = build_layer(linear_feature_map=feature_map)
    x = torch.randn(2, 70, args.dim, dtype=torch.float64)  # two chunks of 64, the second partial
    shape = (2, 70, 3, 8)
    q, k = phi((x @ layer.wq.weight.T).view(shape)), phi((x @ layer.wk.weight.T).view(shape))
    v = (x @ layer.wv.weight.T).view(shape)
    ref = recurrence(q, k, v).reshape(2, 70, 24) @ layer.wo.weight.T
    assert rel_err(layer(x), ref) < 1e-12


def test_layer_causal():
    layer, args = build_layer()
    assert_causal(layer, args.dim, seq_len=80)


@pytest.mark.parametrize("prefill", [0, 5, 70])
def test_prefill_then_decode_equals_full_forward(prefill):
    layer, args = build_layer()
    assert_prefill_then_decode(layer, layer.new_cache(2), args.dim, prefill, seq_len=74)


def test_prefill_in_pieces():
    layer, args = build_layer()
    assert_prefill_in_pieces(layer, layer.new_cache(1), args.dim, seq_len=150, split=67)


def test_layer_documents_and_refusal():
    layer, args = build_layer()
    x = torch.randn(1, 20, args.dim, dtype=torch.float64)
    docs = torch.tensor([[0] * 7 + [1] * 13])
    assert rel_err(layer(x, document_ids=docs)[:, 7:], layer(x[:, 7:])) < 1e-12
    with pytest.raises(NotImplementedError, match="document_ids cannot be combined"):
        layer(x, cache=layer.new_cache(1), document_ids=docs)


def test_unknown_feature_map_fails_clearly():
    with pytest.raises(ValueError, match="linear_feature_map 'tanh' must be one of"):
        LinearAttention(linear_args(linear_feature_map="tanh"))


def test_flops_hand_count():
    args = linear_args(n_heads=9, head_dim=64)
    # per token and head, chunk 64: intra-chunk scores and values over 32 keys on average at
    # 2 FLOPs a multiply-add (2 * 2 * 32 * 64 = 8192), state read q S and q.z
    # (2 * 64 * 64 + 2 * 64 = 8320), state update k v^T and z + k (2 * 64 * 64 + 64 = 8256)
    per_head = 8192 + 8320 + 8256
    assert mixer_kind("linear").flops_per_token(args, 4096) == 3 * 9 * per_head
    assert mixer_kind("linear").family == "recurrent"


def test_model_with_linear_blocks_trains():
    args = linear_args(layer_pattern="linear,mla", n_layers=2, mtp_depth=0, max_seq_len=64)
    args.validate()
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    losses = train_losses(model, torch.randint(0, 256, (2, 40)))
    assert losses[-1] < losses[0] - 0.5, losses

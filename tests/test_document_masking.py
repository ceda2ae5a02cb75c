"""Intra-document masking of packed rows (`document_ids`): each document behaves as its own sequence.

References: the gated delta rule's token-by-token recurrence with the state zeroed at each
boundary, and, for the short conv, the layer and the whole model, running every document
separately (CPU, float64)."""

import pytest
import torch
import torch.nn.functional as F

from fusion_titan.model.short_conv import ShortConv
from fusion_titan.ops.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from tiny_models import tiny_model

F64 = torch.float64


def ids_from_cuts(T: int, cuts_per_row: list[list[int]]) -> torch.Tensor:
    ids = torch.zeros(len(cuts_per_row), T, dtype=torch.long)
    for b, cuts in enumerate(cuts_per_row):
        for c in cuts:
            ids[b, c:] += 1
    return ids


def segments(ids_row: torch.Tensor) -> list[torch.Tensor]:
    return [(ids_row == d).nonzero().flatten() for d in ids_row.unique()]


def gdn_inputs(B, T, H=2, K=8, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=F64)
    gate = -F.softplus(torch.randn(B, T, H, generator=g, dtype=F64))
    beta = torch.rand(B, T, H, generator=g, dtype=F64)
    return q, k, v, gate, beta


# Boundaries inside chunks, two in one chunk, exactly on chunk edges (16, 64), on token 1.
CUTS = [[1, 5, 6, 16, 40, 64], [30, 47]]


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_rule_equals_recurrence_with_resets(chunk, with_state):
    B, T = 2, 75
    q, k, v, g, beta = gdn_inputs(B, T)
    ids = ids_from_cuts(T, CUTS)
    S0 = torch.randn(B, 2, 8, 6, dtype=F64) if with_state else None
    o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                  chunk_size=chunk, document_ids=ids)
    o_ref, S_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=S0,
                                              output_final_state=True, document_ids=ids)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
    # and the masking does something: without ids the outputs differ after the first boundary
    o_plain, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, chunk_size=chunk)
    assert (o_plain[1, 30:] - o[1, 30:]).abs().max() > 1e-3


def test_chunked_rule_gradients_match_the_recurrence():
    B, T = 2, 40
    ids = ids_from_cuts(T, [[3, 16, 17], [25]])
    leaves = [t.requires_grad_() for t in gdn_inputs(B, T, seed=1)]
    w = torch.randn(B, T, 2, 6, dtype=F64)
    (chunk_gated_delta_rule(*leaves, chunk_size=8, document_ids=ids)[0] * w).sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (recurrent_gated_delta_rule(*leaves, document_ids=ids)[0] * w).sum().backward()
    for a, t in zip(grads, leaves):
        torch.testing.assert_close(a, t.grad)


def test_recurrence_with_resets_equals_separate_documents():
    B, T = 2, 50
    q, k, v, g, beta = gdn_inputs(B, T, seed=2)
    ids = ids_from_cuts(T, [[10, 11, 33], [20]])
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta, document_ids=ids)
    for b in range(B):
        for idx in segments(ids[b]):
            alone, _ = recurrent_gated_delta_rule(*(t[b : b + 1, idx] for t in (q, k, v, g, beta)))
            torch.testing.assert_close(o[b : b + 1, idx], alone)


def test_short_conv_does_not_read_across_documents():
    torch.manual_seed(0)
    conv = ShortConv(6, 4, bias=True).double()
    conv.reset_parameters()
    x = torch.randn(2, 20, 6, dtype=F64)
    ids = ids_from_cuts(20, [[2, 3, 9], [15]])
    y, state = conv(x, document_ids=ids)
    assert state is None
    for b in range(2):
        for idx in segments(ids[b]):
            torch.testing.assert_close(y[b, idx], conv(x[b : b + 1, idx])[0][0])


@pytest.mark.parametrize("overrides", [
    dict(layer_schedule="5:1"),                       # MLA + MoE blocks and a Gated DeltaNet block
    dict(layer_schedule="ssm", ssm_type="gdn"),
    dict(layer_schedule="mha", sliding_window=5),     # window shorter than some documents
], ids=["5:1", "ssm", "mha-window"])
def test_model_logits_equal_each_document_run_alone(overrides):
    model = tiny_model(0, **overrides)
    T = 40
    tokens = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    ids = ids_from_cuts(T, [[7, 8, 30], [20]])
    with torch.no_grad():
        masked = model(tokens, document_ids=ids)
        for b in range(2):
            for idx in segments(ids[b]):
                # RoPE is relative, so a document's positions need not restart at 0
                torch.testing.assert_close(masked[b, idx], model(tokens[b : b + 1, idx])[0],
                                           rtol=1e-7, atol=1e-7)
        assert (model(tokens) - masked).abs().max() > 1e-3


def test_training_losses_with_document_ids():
    model = tiny_model(0, layer_schedule="5:1").train()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(tokens, -1, dims=1)
    ids = ids_from_cuts(32, [[10], [5, 20]])
    out = model(tokens, labels=labels, document_ids=ids)
    assert set(out) >= {"ce_sum", "mtp_sums"} and torch.isfinite(out["ce_sum"])
    assert out["ce_sum"].item() != pytest.approx(model(tokens, labels=labels)["ce_sum"].item())
    out["ce_sum"].backward()  # gradients flow through the masked paths


def test_mamba2_mixer_refuses_document_ids():
    model = tiny_model(0, layer_schedule="ssm", ssm_type="mamba2", mamba_head_dim=32, mamba_d_state=32)
    with pytest.raises(NotImplementedError, match="ssm_type"):
        model(torch.zeros(1, 8, dtype=torch.long), document_ids=torch.zeros(1, 8, dtype=torch.long))

"""MTP shift and leak test: each depth's loss depends on exactly the tokens DeepSeek-V3's MTP allows.

Depth k at position i combines the depth k-1 hidden state h_i with the embedding of token i+k and
predicts token i+k+1 (= labels[i+k]). With labels drawn independently of the tokens and a single
labelled position p, every loss (main CE and each depth) is then a function of tokens 0..p only:
  - perturbing any token after p must leave every loss unchanged (no leak), and
  - depth k's only labelled position is i = p-k, whose fed token is i+k = p; the trunk and the
    shallower depths at positions <= p-k never see token p, so perturbing it must change depth k's
    loss through its fed embedding alone (a shift of the fed token or of the target breaks this).
The hidden state each depth combines is pinned the same way by nudging the trunk's output at one
position: depth k's loss must change for position p-k and for no later one.
"""

import pytest
import torch

from fusion_titan.ops.softcap_cross_entropy import IGNORE_INDEX
from tiny_models import tiny_model

SEQ_LEN = 14
DEPTH = 3


def _losses(model, tokens, labels) -> torch.Tensor:
    """[main CE, depth-1 loss, ..., depth-K loss] of one forward."""
    with torch.no_grad():
        out = model(tokens, labels=labels)
    return torch.cat([out["ce_sum"].reshape(1), out["mtp_sums"]])


def _labels_at(tokens: torch.Tensor, p: int, vocab_size: int, gen) -> torch.Tensor:
    """Labels independent of the tokens, with one labelled position (p) per row."""
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, p] = torch.randint(0, vocab_size, (tokens.shape[0],), generator=gen)
    return labels


def _perturbed(tokens: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    changed = tokens.clone()
    changed[:, position] = (changed[:, position] + 1 + vocab_size // 2) % vocab_size
    return changed


@pytest.mark.parametrize("p", [DEPTH, 8])
def test_mtp_depths_see_their_fed_token_and_nothing_after_the_label(p):
    model = tiny_model(seed=0, mtp_depth=DEPTH)
    vocab = model.model_args.vocab_size
    gen = torch.Generator().manual_seed(p)
    tokens = torch.randint(0, vocab, (2, SEQ_LEN), generator=gen)
    labels = _labels_at(tokens, p, vocab, gen)
    out = model(tokens, labels=labels)
    assert out["mtp_tokens"].tolist() == [2] * DEPTH  # every depth scores position p exactly once
    base = _losses(model, tokens, labels)
    assert torch.isfinite(base).all() and (base > 0).all()

    for later in range(p + 1, SEQ_LEN):
        torch.testing.assert_close(_losses(model, _perturbed(tokens, later, vocab), labels), base,
                                   rtol=0, atol=1e-10, msg=f"token {later} > p={p} leaked")

    fed = _losses(model, _perturbed(tokens, p, vocab), labels)
    for k in range(1, DEPTH + 1):
        # depth k's labelled position is i = p - k and it is fed token i + k = p
        assert (fed[k] - base[k]).abs() > 1e-6, f"depth {k} ignores the token it is fed (token {p})"
    assert (fed[0] - base[0]).abs() > 1e-6  # the main CE at p reads token p as its input


def test_mtp_depths_combine_the_hidden_state_of_their_position(monkeypatch):
    p = 8
    model = tiny_model(seed=1, mtp_depth=DEPTH)
    vocab = model.model_args.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, SEQ_LEN), generator=gen)
    labels = _labels_at(tokens, p, vocab, gen)
    base = _losses(model, tokens, labels)
    trunk = model.trunk
    for position in range(p - DEPTH - 1, SEQ_LEN):
        def nudged_trunk(*args, **kwargs):
            h = trunk(*args, **kwargs).clone()
            h[:, position] += 1.0
            return h

        monkeypatch.setattr(model, "trunk", nudged_trunk)
        nudged = _losses(model, tokens, labels)
        # the main head reads the trunk at p; depth k reads it (through depths < k) at <= p-k
        for k, last_read in enumerate([p] + [p - depth for depth in range(1, DEPTH + 1)]):
            changed = (nudged[k] - base[k]).abs() > 1e-6
            unchanged = (nudged[k] - base[k]).abs() < 1e-10
            if position > last_read:
                assert unchanged, f"loss {k} reads the trunk at {position} > {last_read}"
            elif position == last_read:
                assert changed, f"loss {k} ignores the trunk at {last_read}"

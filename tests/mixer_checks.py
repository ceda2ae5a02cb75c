"""Checks every token mixer (fusion_titan/model/mixers) must pass, shared by their tests.

Mixers are called as the blocks call them: `layer(x)` for training, `layer(x, cache=cache)` for
prefill / decode. A mixer that needs a rope table takes it as `rope=` (MLA) or owns it (the rest)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_causal(layer, dim: int, seq_len: int = 30) -> None:
    """Perturbing inputs after position t never changes outputs at <= t (and does change later ones)."""
    x = torch.randn(2, seq_len, dim, dtype=torch.float64)
    y = layer(x)
    for t in (0, seq_len // 3, seq_len - 2):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        y2 = layer(x2)
        assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


def assert_prefill_in_pieces(layer, cache, dim: int, seq_len: int, split: int) -> None:
    """Two multi-token calls continuing through a cache equal one full-sequence call."""
    x = torch.randn(1, seq_len, dim, dtype=torch.float64)
    full = layer(x)
    inc = torch.cat([layer(x[:, :split], cache=cache), layer(x[:, split:], cache=cache)], dim=1)
    assert rel_err(inc, full) < 1e-10


def assert_prefill_then_decode(layer, cache, dim: int, prefill: int, batch: int = 2, seq_len: int = 24):
    """Prefill `prefill` tokens (0 = none), then decode one token at a time: equals the full forward."""
    x = torch.randn(batch, seq_len, dim, dtype=torch.float64)
    full = layer(x)
    outs = [layer(x[:, :prefill], cache=cache)] if prefill else []
    outs += [layer(x[:, t : t + 1], cache=cache) for t in range(prefill, seq_len)]
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-10


def train_losses(model, tokens: torch.Tensor, steps: int = 8, lr: float = 3e-3) -> list[float]:
    """Per-token loss of each of `steps` AdamW steps on `tokens` (their own labels); the last
    step's gradients are left on the parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(tokens, labels=tokens)["ce_sum"] / tokens.numel()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

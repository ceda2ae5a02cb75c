"""Next-token choice from logits: greedy, or temperature + top-k + top-p (nucleus) sampling.

All randomness comes from an explicit torch.Generator, so a seed reproduces a generation.
"""

from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose probability
    sums to >= p (always at least the top token), -inf elsewhere."""
    if p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError("top_p must be in (0, 1]")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B, 1]. temperature 0 = greedy (argmax; top-k/p don't matter)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    filtered = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = filtered.softmax(dim=-1)
    # torch.multinomial draws on the generator's device; keep probs there.
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)

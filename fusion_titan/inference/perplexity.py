"""Held-out perplexity: exp(total CE / total predicted tokens).

The model's forward with labels returns the CE *sum* over its non-ignored labels (the head is
fused with softcap + CE, logits never materialize), so the exact token-weighted mean over many
batches is sum(ce_sum) / sum(tokens), not a mean of per-batch means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..ops.softcap_cross_entropy import IGNORE_INDEX


@dataclass
class PerplexityResult:
    ce_sum: float
    tokens: int
    batches: int

    @property
    def mean_ce(self) -> float:
        return self.ce_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_ce)


def ce_sum_and_tokens(model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, number of non-ignored labels) of one batch, as 0-d tensors on the model's device.

    Only `ce_sum` of the model's loss dict is used: MTP and balance terms are training losses."""
    out = model(inputs, labels=labels)
    return out["ce_sum"].detach().float(), (labels != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable, steps: int = -1, device=None) -> PerplexityResult:
    """Mean CE / perplexity over `batches` ((input_dict, labels) pairs as our loaders yield them),
    at most `steps` batches (-1 = all)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce, tokens, n = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        for input_dict, labels in batches:
            if 0 <= steps <= n:
                break
            batch_ce, batch_tokens = ce_sum_and_tokens(
                model, input_dict["input"].to(device), labels.to(device))
            ce += batch_ce.double().cpu()
            tokens += int(batch_tokens)
            n += 1
    finally:
        model.train(was_training)
    return PerplexityResult(ce_sum=float(ce), tokens=tokens, batches=n)

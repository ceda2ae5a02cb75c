"""MoE auxiliary losses on the router's outputs (unweighted; the MoE layer applies the weights).

Notation for one MoE call: N tokens, E experts, k experts per token, scores s [N, E] (softmax
probabilities, or DeepSeek's sigmoid affinities), indices [N, k] the chosen experts *before*
capacity dropping (indices[:, 0] = first choice). P_i = mean_t s_{i,t} / sum_j s_{j,t} is the
router's mean probability of expert i (the normalization is a no-op for softmax scores). Only P
(or the logits) carries gradient; the counts do not.

- `switch_balance_loss` (Switch Transformer, Fedus et al. 2021, eq. 4-6, with every one of the
  k slots counted): E * sum_i f_i P_i, f_i = (assignments to i) / (N k). 1 when balanced.
- `gshard_balance_loss` (GShard, Lepikhin et al. 2020, Algorithm 1: l_aux = (1/E) sum_e
  (c_e/S) m_e, where c_e counts the tokens whose *first* choice is e and m_e is the mean gate),
  times E^2 as in its Lingvo, fairscale and DeepSpeed implementations: E * sum_i c_i P_i,
  c_i = (tokens whose first choice is i) / N. 1 when balanced; equals the Switch loss for k = 1.
- `router_z_loss` (ST-MoE, Zoph et al. 2022, eq. 5): mean_t (logsumexp_i logits_{i,t})^2.
- `sequence_balance_loss` (DeepSeek-V3 eq. 17-20): the Switch form per sequence, averaged.
"""

from __future__ import annotations

import torch

from ..ops.precision import compute_dtype


def _mean_probs(scores: torch.Tensor) -> torch.Tensor:
    """P [..., E]: the mean over tokens (dim -2) of each token's normalized scores."""
    return (scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)).mean(-2)


def _fractions(chosen: torch.Tensor, n_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """chosen [..., N, j] expert ids -> [..., E]: the fraction of the N * j choices that pick
    each expert."""
    flat = chosen.flatten(-2)
    counts = torch.zeros(*flat.shape[:-1], n_experts, dtype=dtype, device=chosen.device)
    counts.scatter_add_(-1, flat, torch.ones_like(flat, dtype=dtype))
    return counts / flat.shape[-1]


def _weighted_balance(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """E * sum_i frac_i P_i per group of tokens (leading dims), averaged over the groups."""
    n_experts = scores.shape[-1]
    frac = _fractions(chosen, n_experts, scores.dtype)
    return (n_experts * (frac * _mean_probs(scores)).sum(-1)).mean()


def switch_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """scores [N, E], indices [N, k] -> E * sum_i f_i P_i over all k slots (0-dim)."""
    return _weighted_balance(scores, indices)


def gshard_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """scores [N, E], indices [N, k] -> E * sum_i c_i P_i with first choices only (0-dim)."""
    return _weighted_balance(scores, indices[..., :1])


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, E] -> mean over tokens of logsumexp(logits)^2, in >= fp32 (0-dim)."""
    return torch.logsumexp(logits.to(compute_dtype(logits.dtype)), dim=-1).square().mean()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sequence-wise balance loss of DeepSeek-V3 (eq. 17-20), without the alpha factor: the
    Switch form within each sequence, averaged over the batch.

    scores [B, T, E] unbiased affinities, indices [B, T, k] chosen experts. Per sequence:
    f_i = E / (k T) * #tokens choosing i, P_i = mean_t s_{i,t} / sum_j s_{j,t}, loss = sum_i f_i P_i.
    Only P carries gradient. A perfectly balanced sequence gives 1.
    """
    return _weighted_balance(scores, indices)


# `[model] moe_aux_loss` -> the batch balance loss (None = off)
BALANCE_LOSSES = {"none": None, "switch": switch_balance_loss, "gshard": gshard_balance_loss}


def balance_loss_fn(name: str):
    if name not in BALANCE_LOSSES:
        raise ValueError(f"moe_aux_loss {name!r} is not known: use one of {sorted(BALANCE_LOSSES)}")
    return BALANCE_LOSSES[name]

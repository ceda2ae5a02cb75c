"""MoE routers: token -> (gate weights, chosen experts, per-expert scores), picked by `[model] moe_router`.

Every router maps x [N, dim] to (weights [N, k], indices [N, k], scores [N, E]) and, with
`return_logits=True`, also the gate logits [N, E] (for the router z-loss). Weights, scores and
logits are in `compute_dtype(x.dtype)` (fp32 for bf16 inputs). `indices[:, 0]` is each token's
first choice. Static shapes only, so each compiles with fullgraph=True.

- "deepseek" (`GroupLimitedRouter`, DeepSeek-V3 §2.1.2), per token t with input u_t:
    s_{i,t} = sigmoid(u_t . e_i)                    affinities
    c_{i,t} = s_{i,t} + b_i                         b: selection bias (aux-loss-free balancing)
    group score_g = sum of the two largest c_{i,t} in group g (the largest one if groups have one expert)
    keep the n_limited_groups best groups, then the top_k experts by c among the kept groups
    g_{i,t} = route_scale * s_{i,t} / sum_{j chosen} s_{j,t}   for chosen i (0 otherwise)
  The bias b only changes *which* experts are chosen; the gate weights use the unbiased s.
- "softmax_topk" (`SoftmaxTopKRouter`; Switch Transformer for k = 1, GShard for k = 2):
    p_{i,t} = softmax_i(u_t . e_i)                  probabilities
    the top_k experts by p; g_{i,t} = p_{i,t} (Switch), or p_{i,t} / sum_{j chosen} p_{j,t} with
    `normalize_topk` (GShard's top-2 combine weights). No expert bias: balance comes from the
    losses in `balance_losses.py`.

Both optionally apply Switch Transformer's jitter in training: the router input is multiplied by
noise drawn uniformly from [1 - jitter, 1 + jitter] (elementwise, torch's global RNG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.precision import compute_dtype


@dataclass(frozen=True)
class RouterSettings:
    """Router knobs of `FusionModelArgs`; each router reads the ones that apply to it."""

    n_groups: int = 0
    n_limited_groups: int = 0
    route_scale: float = 1.0
    jitter: float = 0.0
    normalize_topk: bool = False


def check_jitter(jitter: float) -> None:
    if not 0 <= jitter < 1:
        raise ValueError(f"moe_router_jitter must be in [0, 1) (noise range 1 +- jitter), got {jitter}")


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries along the last dim and their indices, largest first, ties to the
    lower index. By a stable sort rather than torch.topk: inductor compiles a sort over a few
    dozen entries into a Triton kernel fused with the router's other ops, where topk stays a
    library call (`gatherTopK`, 1.8% of GPU time in a compiled fusion_1b step on an H200)."""
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def jittered(x: torch.Tensor, jitter: float, training: bool) -> torch.Tensor:
    """Switch Transformer's multiplicative router-input noise, training forwards only."""
    if not training or jitter <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)


class TopKRouter(nn.Module):
    """What every router has: a bias-free gate linear dim -> n_experts, top-k, input jitter."""

    uses_expert_bias = False  # no selection bias: the bias-update rule is skipped for it

    def __init__(self, dim: int, n_experts: int, top_k: int, jitter: float = 0.0):
        super().__init__()
        if top_k > n_experts:
            raise ValueError(f"top_k ({top_k}) cannot exceed n_experts ({n_experts})")
        check_jitter(jitter)
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.n_experts = n_experts
        self.top_k = top_k
        self.jitter = jitter


class GroupLimitedRouter(TopKRouter):
    """DeepSeek-V3 router: sigmoid affinities, group-limited top-k, bias-based balancing."""

    uses_expert_bias = True  # the bias-update rule (training/moe_balance.py) applies

    def __init__(self, dim: int, n_experts: int, top_k: int, n_groups: int, n_limited_groups: int,
                 route_scale: float, jitter: float = 0.0):
        super().__init__(dim, n_experts, top_k, jitter)
        # Group limiting is a no-op with one group or when every group is kept.
        n_groups = n_groups if n_groups and n_groups > 1 else 0
        if n_groups:
            if n_experts % n_groups:
                raise ValueError(f"n_experts ({n_experts}) must be divisible by n_groups ({n_groups})")
            if not 1 <= n_limited_groups <= n_groups:
                raise ValueError(f"n_limited_groups ({n_limited_groups}) must be in [1, {n_groups}]")
            if top_k > n_limited_groups * (n_experts // n_groups):
                raise ValueError(f"top_k ({top_k}) exceeds the experts of {n_limited_groups} kept groups")
            if n_limited_groups == n_groups:
                n_groups = 0
        self.n_groups = n_groups
        self.n_limited_groups = n_limited_groups if n_groups else 0
        self.route_scale = route_scale

    @classmethod
    def from_settings(cls, dim: int, n_experts: int, top_k: int, s: RouterSettings) -> "GroupLimitedRouter":
        # normalize_topk does not apply: these weights are always normalized (times route_scale)
        return cls(dim, n_experts, top_k, s.n_groups, s.n_limited_groups, s.route_scale, s.jitter)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None, return_logits: bool = False):
        logits = self.gate(jittered(x, self.jitter, self.training))
        logits = logits.to(compute_dtype(logits.dtype))
        scores = torch.sigmoid(logits)
        choice = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        if self.n_groups:
            group_size = self.n_experts // self.n_groups
            grouped = choice.view(-1, self.n_groups, group_size)
            group_score = top_k(grouped, min(2, group_size))[0].sum(-1)  # [N, G]
            keep = top_k(group_score, self.n_limited_groups)[1]
            masked = torch.ones_like(group_score, dtype=torch.bool).scatter(1, keep, False)
            choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).view_as(scores)
        indices = top_k(choice, self.top_k)[1]
        weights = scores.gather(1, indices)  # unbiased affinities: the bias never reaches the weights
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20) * self.route_scale
        return (weights, indices, scores, logits) if return_logits else (weights, indices, scores)


class SoftmaxTopKRouter(TopKRouter):
    """Softmax router with plain top-k (Switch Transformer top-1, GShard / Mixtral-style top-k)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, jitter: float = 0.0,
                 normalize_topk: bool = False):
        super().__init__(dim, n_experts, top_k, jitter)
        self.normalize_topk = normalize_topk

    @classmethod
    def from_settings(cls, dim: int, n_experts: int, top_k: int, s: RouterSettings) -> "SoftmaxTopKRouter":
        # groups and route_scale are DeepSeek-V3 knobs: not used here
        return cls(dim, n_experts, top_k, s.jitter, s.normalize_topk)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None, return_logits: bool = False):
        if expert_bias is not None:
            raise ValueError("the softmax_topk router takes no expert bias")
        logits = self.gate(jittered(x, self.jitter, self.training))
        logits = logits.to(compute_dtype(logits.dtype))
        probs = torch.softmax(logits, dim=-1)
        weights, indices = top_k(probs, self.top_k)
        if self.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return (weights, indices, probs, logits) if return_logits else (weights, indices, probs)


ROUTERS = {"deepseek": GroupLimitedRouter, "softmax_topk": SoftmaxTopKRouter}


def router_class(name: str) -> type[nn.Module]:
    if name not in ROUTERS:
        raise ValueError(f"moe_router {name!r} is not known: use one of {sorted(ROUTERS)}")
    return ROUTERS[name]

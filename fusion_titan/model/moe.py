"""DeepSeekMoE feed-forward (DeepSeek-V3 §2.1.2): shared experts + group-limited sigmoid routing.

Routing: sigmoid affinities s; a per-expert bias b (aux-loss-free balancing, Wang et al. 2024)
is added to s for *selection only*; of the n_expert_groups groups the n_limited_groups with the
highest group score (sum of the group's top-2 biased affinities) are kept, then the top-k experts
inside them. Gate weights are the unbiased affinities of the chosen experts, normalized to sum to
one and times route_scale. The bias is moved outside autograd after each optimizer step, from the
load counted here (`tokens_per_expert`); see `fusion_titan.training.moe_balance`.

Expert compute reuses torchtitan's GroupedExperts (grouped GEMM on GPU, a per-expert loop on CPU),
which is also what its expert-parallel plan shards.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from torchtitan.models.moe.moe import FeedForward, GroupedExperts


class GroupLimitedRouter(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, n_groups: int, n_limited_groups: int,
                 route_scale: float):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_groups = n_groups if n_groups and n_groups > 1 else 0
        self.n_limited_groups = n_limited_groups
        self.route_scale = route_scale

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None):
        """x [N, dim] -> (gate weights [N, k] fp32, expert indices [N, k], affinities [N, E] fp32)."""
        scores = torch.sigmoid(self.gate(x).float())
        choice = scores if expert_bias is None else scores + expert_bias
        if self.n_groups:
            grouped = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_score.topk(self.n_limited_groups, dim=-1).indices
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view_as(choice)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20) * self.route_scale
        return weights, indices, scores


class DeepSeekMoE(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, n_shared: int, inter_dim: int,
                 n_groups: int, n_limited_groups: int, route_scale: float, bias_update_rate: float,
                 use_grouped_mm: bool):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.router = GroupLimitedRouter(dim, n_experts, top_k, n_groups, n_limited_groups, route_scale)
        self.experts = GroupedExperts(dim, inter_dim, n_experts, use_grouped_mm=use_grouped_mm)
        self.shared_experts = FeedForward(dim, inter_dim * n_shared) if n_shared > 0 else None
        # Selection bias: persistent (it is training state), never touched by autograd.
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)
        # Tokens routed to each expert since the last optimizer step (summed over micro-batches).
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        x = x.reshape(-1, dim)
        bias = self.expert_bias if self.bias_update_rate > 0 else None
        weights, indices, _ = self.router(x, bias)

        flat = indices.reshape(-1)
        # scatter_add instead of histc: histc has no integer CPU kernel, and this compiles.
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        with torch.no_grad():
            self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))

        order = torch.argsort(flat, stable=True)  # group the (token, slot) pairs by expert
        routed = self.experts(x[order // self.top_k], counts)
        unsorted = torch.empty_like(routed)
        unsorted[order] = routed
        out = torch.einsum("nk,nkd->nd", weights, unsorted.view(-1, self.top_k, dim).float()).type_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(bsz, seqlen, dim)

    def init_weights(self, std: float, out_std: float, buffer_device: torch.device | None = None) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, std=std, a=-3 * std, b=3 * std)
        for w, s in ((self.experts.w1, std), (self.experts.w3, std), (self.experts.w2, out_std)):
            nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)
        if self.shared_experts is not None:
            for lin, s in ((self.shared_experts.w1, std), (self.shared_experts.w3, std),
                           (self.shared_experts.w2, out_std)):
                nn.init.trunc_normal_(lin.weight, std=s, a=-3 * s, b=3 * s)
        device = buffer_device or self.expert_bias.device
        self.expert_bias = torch.zeros(self.n_experts, device=device)
        self.tokens_per_expert = torch.zeros(self.n_experts, device=device)

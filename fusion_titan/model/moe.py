"""DeepSeekMoE feed-forward (DeepSeek-V3 §2.1.2; DeepSeek-V2 §2.2): shared + routed experts.

Routing: a router from `routers.ROUTERS`, picked by `[model] moe_router`: "deepseek"
(`GroupLimitedRouter`: sigmoid affinities, group-limited top-k, selection bias b moved outside
autograd after each optimizer step from the load counted here, `tokens_per_expert`, see
`fusion_titan.training.moe_balance`) or "softmax_topk" (`SoftmaxTopKRouter`: Switch / GShard
softmax top-k, no bias). See `routers.py` for the formulas.

Extras (all off by default):
  - auxiliary losses (`balance_losses.py`), summed with their weights into `self.aux_loss` after
    each training forward for the model to add: `seq_aux_loss_weight` = alpha > 0, the
    complementary sequence-wise balance loss of DeepSeek-V3 (eq. 17-20); `aux_loss` = "switch" |
    "gshard" with `aux_loss_weight`, a batch balance loss over the call's tokens; `z_loss_weight`
    > 0, ST-MoE's router z-loss on the gate logits.
  - `capacity_factor` > 0 (training forwards only): each expert takes at most
    ceil(capacity_factor * N * top_k / n_experts) of the N*top_k (token, expert) assignments of one
    call; the rest are dropped (weight 0, not computed, not renormalized; the token keeps the shared
    experts and the residual), counted in `dropped_tokens`. Within an expert the assignments with
    the largest gate weight are kept; equal weights keep the earlier token.

Load counters (`tokens_per_expert`, `dropped_tokens`) count training forwards only, before
dropping, and skip the forward that activation checkpointing recomputes during backward.
`load_metrics` / `moe_load_counters` turn them into per-step statistics.

Expert compute reuses torchtitan's GroupedExperts weights and kernels (grouped GEMM
`torch._grouped_mm` on CUDA, a per-expert loop otherwise), which is also what its expert-parallel
plan shards. Token permutation (`dispatch`): "static" (default) lays the assignments out in
expert groups padded to `group_align` rows with static shapes and gathers only
(`moe_dispatch.py`), so the routed path has no host sync and compiles with fullgraph=True (the
per-expert loop of the CPU path alone reads the group sizes on the host); "legacy" is torchtitan
0.2.2's argsort + index + GroupedExperts, and what expert parallel always uses (its all-to-all
needs the exact counts on the host).
`reference_moe_forward` is a slow, obviously-correct token-by-token version for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from torchtitan.models.moe.moe import (
    FeedForward,
    GroupedExperts,
    _run_experts_for_loop,
    _run_experts_grouped_mm,
)

from ..ops.precision import compute_dtype
from . import moe_dispatch

MOE_DISPATCHES = ("static", "legacy")
# How the k expert outputs of a token are weighted and summed: "sum" (k multiply-adds, which
# inductor fuses into one pointwise kernel with the casts) or "einsum" (a batched matmul with an
# inner dimension of k: cuBLAS's batched GEMM/GEMV kernels for 1 x k x dim products, 7% of a
# compiled fusion_1b step on an H200 in Session 8's profile).
MOE_COMBINES = ("sum", "einsum")

from .balance_losses import balance_loss_fn, router_z_loss, sequence_balance_loss
from .routers import GroupLimitedRouter, RouterSettings, router_class  # noqa: F401 (re-exported)


def _in_backward() -> bool:
    """True while autograd runs a backward, e.g. while activation checkpointing recomputes forward.

    False while torch.compile traces: a compiled region's Python runs once, at trace time, and
    when the compiled region holds the checkpoint wrapper (apply_compile compiles the wrapped
    block, never a module inside it) the recompute happens in the compiled backward graph, which
    replays no side effects.
    """
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def capacity_dispatch(indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                      capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (token, slot) assignments fit into their expert's capacity.

    indices / weights [N, k], counts [E] (assignments per expert). Within each expert the
    assignments are ranked by gate weight (descending; ties keep the earlier token) and the first
    `capacity` are kept. Returns (keep [N*k] bool in flat assignment order, kept counts [E]).
    Static shapes; no host sync.
    """
    flat = indices.reshape(-1)
    n = flat.numel()
    by_weight = torch.argsort(-weights.detach().reshape(-1), stable=True)
    priority = by_weight[torch.argsort(flat[by_weight], stable=True)]  # by expert, then by weight
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=flat.device) - starts[flat[priority]]
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device).scatter(0, priority, rank < capacity)
    return keep, counts.clamp(max=capacity)


class DeepSeekMoE(nn.Module):
    """[B, T, dim] -> [B, T, dim]: shared experts + top-k routed experts.

    Buffers: `expert_bias` [E] (persistent selection bias; stays zero for a router without one),
    `tokens_per_expert` [E] float and `dropped_tokens` [] float (non-persistent; assignments
    routed / dropped in training forwards since the last reset, counted before capacity dropping,
    not recounted during activation checkpointing recompute). `aux_loss`: the weighted sum of the
    auxiliary losses of the last training forward, a 0-dim tensor, zero when all are off or in eval.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, n_shared: int, inter_dim: int,
                 n_groups: int, n_limited_groups: int, route_scale: float, bias_update_rate: float,
                 use_grouped_mm: bool, seq_aux_loss_weight: float = 0.0, capacity_factor: float = 0.0,
                 dispatch: str = "static", group_align: int = 16, combine: str = "sum",
                 router: str = "deepseek", router_jitter: float = 0.0, normalize_topk: bool = False,
                 aux_loss: str = "none", aux_loss_weight: float = 0.0, z_loss_weight: float = 0.0):
        super().__init__()
        if dispatch not in MOE_DISPATCHES:
            raise ValueError(f"[model] moe_dispatch = {dispatch!r}: choose one of {MOE_DISPATCHES}")
        if combine not in MOE_COMBINES:
            raise ValueError(f"[model] moe_combine = {combine!r}: choose one of {MOE_COMBINES}")
        if group_align < 1:
            raise ValueError(f"[model] moe_group_align = {group_align}: must be >= 1 (1 = no padding)")
        self.dispatch_mode = dispatch
        self.group_align = group_align
        self.combine = combine
        self.dim = dim
        self.n_experts = n_experts
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.seq_aux_loss_weight = seq_aux_loss_weight
        self.balance_loss = balance_loss_fn(aux_loss)
        self.aux_loss_weight = aux_loss_weight if self.balance_loss is not None else 0.0
        self.z_loss_weight = z_loss_weight
        self.capacity_factor = capacity_factor
        settings = RouterSettings(n_groups=n_groups, n_limited_groups=n_limited_groups,
                                  route_scale=route_scale, jitter=router_jitter,
                                  normalize_topk=normalize_topk)
        self.router = router_class(router).from_settings(dim, n_experts, top_k, settings)
        self.experts = GroupedExperts(dim, inter_dim, n_experts, use_grouped_mm=use_grouped_mm)
        self.shared_experts = FeedForward(dim, inter_dim * n_shared) if n_shared > 0 else None
        # Selection bias: persistent (it is training state), never touched by autograd.
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)
        # Assignments routed to each expert since the last optimizer step (summed over micro-batches).
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts), persistent=False)
        # Assignments dropped by the capacity limit over the same period.
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.aux_loss = torch.zeros(())

    @classmethod
    def from_args(cls, args) -> "DeepSeekMoE":
        """The MoE layer of a FusionModelArgs (grouped GEMM only where CUDA is available)."""
        return cls(
            args.dim, args.n_routed_experts, args.n_activated_experts, args.n_shared_experts,
            args.moe_inter_dim, args.n_expert_groups, args.n_limited_groups, args.route_scale,
            args.moe_bias_update_rate, use_grouped_mm=args.use_grouped_mm and torch.cuda.is_available(),
            seq_aux_loss_weight=args.moe_seq_aux_weight, capacity_factor=args.moe_capacity_factor,
            router=args.moe_router, router_jitter=args.moe_router_jitter,
            normalize_topk=args.moe_router_norm_topk, aux_loss=args.moe_aux_loss,
            aux_loss_weight=args.moe_aux_loss_weight, z_loss_weight=args.moe_router_z_loss_weight,
            dispatch=args.moe_dispatch, group_align=args.moe_group_align, combine=args.moe_combine,
        )

    def _combine(self, weights: torch.Tensor, per_slot: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """sum_j weights[:, j] * per_slot[:, j] in cdt: weights [n, k], per_slot [n, k, dim]."""
        if self.combine == "einsum":
            return torch.einsum("nk,nkd->nd", weights, per_slot.to(cdt))
        if torch.promote_types(per_slot.dtype, cdt) != cdt:
            per_slot = per_slot.to(cdt)
        # else type promotion computes in cdt and autograd keeps the narrower per_slot for the
        # weights' gradient (an explicit cast would keep k cdt-wide copies of it in eager mode)
        out = weights[:, 0, None] * per_slot[:, 0]
        for j in range(1, per_slot.shape[1]):
            out = out + weights[:, j, None] * per_slot[:, j]
        return out

    @property
    def has_aux_loss(self) -> bool:
        return self.seq_aux_loss_weight > 0 or self.aux_loss_weight > 0 or self.z_loss_weight > 0

    def capacity(self, n_tokens: int) -> int:
        """Assignments one expert may take in a call with n_tokens tokens (0 = unlimited)."""
        if self.capacity_factor <= 0:
            return 0
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def reset_load_counters(self) -> None:
        self.tokens_per_expert.zero_()
        self.dropped_tokens.zero_()

    def _experts_need_exact_rows(self) -> bool:
        # Expert parallel all-to-alls exactly sum(counts) rows; the local paths accept trailing rows.
        w = self.experts.w1
        return isinstance(w, DTensor) and "ep" in (w.device_mesh.mesh_dim_names or ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        x = x.reshape(-1, dim)
        n_tokens, k = x.shape[0], self.top_k
        bias = self.expert_bias if self.router.uses_expert_bias else None
        weights, indices, scores, logits = self.router(x, bias, return_logits=True)
        flat = indices.reshape(-1)
        # scatter_add instead of histc: histc has no integer CPU kernel, and this compiles.
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))

        # Capacity dropping in training only; an expert can get at most n_tokens assignments.
        capacity = self.capacity(n_tokens) if self.training else 0
        if not 0 < capacity < n_tokens:
            capacity = 0
        keep = None
        expert_counts = counts
        if capacity:
            keep, expert_counts = capacity_dispatch(indices, weights, counts, capacity)

        if self.training and not _in_backward():
            with torch.no_grad():
                self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))
                if keep is not None:
                    self.dropped_tokens.add_((counts - expert_counts).sum().to(self.dropped_tokens.dtype))

        if self.dispatch_mode == "static" and not self._experts_need_exact_rows():
            per_slot = self._routed_static(x, flat, expert_counts, keep, capacity)
        else:
            per_slot = self._routed_legacy(x, flat, expert_counts, keep)
        cdt = weights.dtype
        if keep is not None:
            weights = weights * keep.view_as(weights)
        out = self._combine(weights, per_slot.view(n_tokens, k, dim), cdt).type_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        if self.training and self.has_aux_loss:
            aux = self._aux_losses(scores, indices, logits, bsz, seqlen)
            if not _in_backward():
                self.aux_loss = aux
        elif not _in_backward():
            self.aux_loss = torch.zeros((), device=x.device)
        return out.view(bsz, seqlen, dim)

    def _routed_static(self, x, flat, expert_counts, keep, capacity) -> torch.Tensor:
        """Expert outputs per (token, slot) [N*k, dim] through the static padded row layout."""
        layout = moe_dispatch.row_layout(flat, expert_counts, self.top_k, keep, capacity, self.group_align)
        rows = moe_dispatch.dispatch(x, layout, self.top_k)
        return moe_dispatch.combine(self._run_experts(rows, layout.group_sizes), layout)

    def _run_experts(self, rows: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """GroupedExperts' kernels on rows already grouped and padded (no second permutation)."""
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w
                      for w in (self.experts.w1, self.experts.w2, self.experts.w3))
        run = _run_experts_grouped_mm if self.experts.use_grouped_mm else _run_experts_for_loop
        return run(w1, w2, w3, rows, group_sizes)

    def _routed_legacy(self, x, flat, expert_counts, keep) -> torch.Tensor:
        """torchtitan 0.2.2's way (argsort + index + GroupedExperts); the path expert parallel uses."""
        dim, n_assign = x.shape[-1], flat.numel()
        if keep is not None:
            # Kept assignments grouped by expert, dropped ones at the end.
            order = torch.argsort(flat.masked_fill(~keep, self.n_experts), stable=True)
        else:
            order = torch.argsort(flat, stable=True)  # group the (token, slot) pairs by expert
        routed_in = x[order // self.top_k]
        if keep is not None and self._experts_need_exact_rows():
            n_kept = int(expert_counts.sum())  # host sync; EP syncs for its splits anyway
            routed = self.experts(routed_in[:n_kept], expert_counts)
            routed = torch.cat([routed, routed.new_zeros(n_assign - n_kept, dim)])
        else:
            # Rows past sum(expert_counts) are not computed (zeros on the loop path, unspecified on
            # the grouped-GEMM path): masked below.
            routed = self.experts(routed_in, expert_counts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n_assign, device=x.device))
        per_slot = routed[inverse]  # back to (token, slot) order
        if keep is not None:
            per_slot = torch.where(keep.unsqueeze(-1), per_slot, 0.0)
        return per_slot

    def _aux_losses(self, scores: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor,
                    bsz: int, seqlen: int) -> torch.Tensor:
        """The weighted sum of the enabled auxiliary losses (routing before capacity dropping)."""
        aux = torch.zeros((), dtype=scores.dtype, device=scores.device)
        if self.seq_aux_loss_weight > 0:
            aux = aux + self.seq_aux_loss_weight * sequence_balance_loss(
                scores.view(bsz, seqlen, -1), indices.view(bsz, seqlen, -1))
        if self.aux_loss_weight > 0:
            aux = aux + self.aux_loss_weight * self.balance_loss(scores, indices)
        if self.z_loss_weight > 0:
            aux = aux + self.z_loss_weight * router_z_loss(logits)
        return aux

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
        self.dropped_tokens = torch.zeros((), device=device)
        self.aux_loss = torch.zeros((), device=device)


# ----------------------------------------------------------------------------------------------
# Load metrics


def moe_load_counters(layers: list[DeepSeekMoE]) -> tuple[torch.Tensor, torch.Tensor]:
    """(load [layers, experts], dropped [layers]) read from the layers' buffers (not reset)."""
    load = torch.stack([m.tokens_per_expert.float() for m in layers])
    dropped = torch.stack([m.dropped_tokens.float().reshape(()) for m in layers])
    return load, dropped


@torch.no_grad()
def load_metrics(load: torch.Tensor, dropped: torch.Tensor | None = None,
                 routed: torch.Tensor | None = None, ep_degree: int = 1) -> dict[str, float]:
    """Expert-load statistics of one step, as Python floats under "moe/..." keys.

    load [layers, experts] (or [experts]): assignments routed to each expert (before dropping).
    dropped [layers] (or scalar): assignments dropped by the capacity limit.
    routed [layers] (or scalar): assignments routed in all; defaults to load.sum(-1).
    Keys: max_over_mean_load (worst layer), mean_max_over_mean_load, min_over_mean_load (worst
    layer), routing_entropy (normalized, 1 = uniform, mean over layers), min_routing_entropy,
    dead_expert_fraction (experts with no tokens, over all layers) and, with `dropped`,
    dropped_fraction (over all layers) and max_layer_dropped_fraction.
    ep_degree > 1 (expert parallel: rank r holds the r-th contiguous block of E / ep_degree
    experts) adds max_over_mean_ep_rank_load (worst layer) and mean_max_over_mean_ep_rank_load:
    the busiest rank's assignments over the ranks' mean, which every rank waits for in each
    layer's all-to-all, so the mean over layers bounds the expert compute's slow-down.
    """
    load = load.float().reshape(-1, load.shape[-1])
    n_experts = load.shape[-1]
    total = load.sum(-1)
    mean = load.mean(-1).clamp_min(1e-9)
    frac = load / total.clamp_min(1).unsqueeze(-1)
    entropy = -(frac * frac.clamp_min(1e-12).log()).sum(-1) / math.log(max(n_experts, 2))
    hi, lo = load.max(-1).values / mean, load.min(-1).values / mean
    out = {"moe/max_over_mean_load": hi.max().item(),
           "moe/mean_max_over_mean_load": hi.mean().item(),
           "moe/min_over_mean_load": lo.min().item(),
           "moe/routing_entropy": entropy.mean().item(),
           "moe/min_routing_entropy": entropy.min().item(),
           "moe/dead_expert_fraction": (load == 0).float().mean().item()}
    if ep_degree > 1:
        # load is summed over the whole data-parallel mesh: with one EP group (world = EP degree,
        # as in two_gpu_checks) this is the straggler every rank waits for; with several groups
        # it is their sum's imbalance, a lower bound of the worst group's
        per_rank = load.reshape(load.shape[0], ep_degree, -1).sum(-1)
        rank_hi = per_rank.max(-1).values / per_rank.mean(-1).clamp_min(1e-9)
        out["moe/max_over_mean_ep_rank_load"] = rank_hi.max().item()
        out["moe/mean_max_over_mean_ep_rank_load"] = rank_hi.mean().item()
    if dropped is not None:
        dropped = dropped.float().reshape(-1).to(load.device)
        routed = total if routed is None else routed.float().reshape(-1).to(load.device)
        out["moe/dropped_fraction"] = (dropped.sum() / routed.sum().clamp_min(1)).item()
        out["moe/max_layer_dropped_fraction"] = (dropped / routed.clamp_min(1)).max().item()
    return out


# ----------------------------------------------------------------------------------------------
# Reference


def _expert_ffn(moe: DeepSeekMoE, e: int, x: torch.Tensor) -> torch.Tensor:
    w1, w2, w3 = moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e]
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def reference_moe_forward(moe: DeepSeekMoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token DeepSeekMoE forward with Python lists for every decision (slow; tests only).

    Same semantics as `DeepSeekMoE.forward` (including capacity dropping in training mode), same
    autograd graph leaves; no counters or aux loss are touched.
    """
    r = moe.router
    if not isinstance(r, GroupLimitedRouter):
        raise TypeError("reference_moe_forward follows the deepseek router only; the softmax_topk "
                        "router's reference is in tests/test_routers.py")
    bsz, seqlen, dim = x.shape
    tokens = x.reshape(-1, dim)
    n_tokens, n_experts, k = tokens.shape[0], moe.n_experts, moe.top_k
    n_groups = r.n_groups or 1
    n_keep_groups = r.n_limited_groups if r.n_groups else 1
    group_size = n_experts // n_groups
    bias = moe.expert_bias.tolist()

    routes = []  # per token: list of (expert, weight tensor)
    for t in range(n_tokens):
        logits = r.gate(tokens[t])
        s = torch.sigmoid(logits.to(compute_dtype(logits.dtype)))
        c = [v + b for v, b in zip(s.tolist(), bias)]
        group_scores = []
        for g in range(n_groups):
            members = sorted(c[g * group_size:(g + 1) * group_size], reverse=True)
            group_scores.append(sum(members[:2]))
        kept_groups = sorted(range(n_groups), key=lambda g: -group_scores[g])[:n_keep_groups]
        candidates = [e for e in range(n_experts) if e // group_size in kept_groups]
        chosen = sorted(candidates, key=lambda e: -c[e])[:k]
        total = sum(s[e] for e in chosen)
        routes.append([(e, s[e] / total * r.route_scale) for e in chosen])

    capacity = moe.capacity(n_tokens) if moe.training else 0
    if capacity:
        for e in range(n_experts):
            takers = [(t, j) for t in range(n_tokens) for j, (ee, _) in enumerate(routes[t]) if ee == e]
            takers.sort(key=lambda tj: (-routes[tj[0]][tj[1]][1].item(), tj[0]))
            for t, j in takers[capacity:]:
                routes[t][j] = (e, None)  # dropped

    out = []
    for t in range(n_tokens):
        y = torch.zeros(dim, dtype=compute_dtype(x.dtype), device=x.device)
        for e, w in routes[t]:
            if w is not None:
                y = y + w * _expert_ffn(moe, e, tokens[t]).to(y.dtype)
        y = y.to(x.dtype)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(tokens[t])
        out.append(y)
    return torch.stack(out).view(bsz, seqlen, dim)

"""Hyper-connections: the residual stream widened to n streams (`[model] residual = "hyper"`).

The trunk carries streams H [B, T, n, D] (`expand_streams` copies the embedding into every
stream, `collapse_streams` sums them before the final norm). Around each sublayer F (mixer or
FFN, pre-norm included) a `HyperConnection` computes, per token,

    h   = sum_k pre_k H_k                       width connection: the sublayer's input
    H'_i = sum_k res_ik H_k + post_i F(h)       depth connection: write back and mix streams

`hyper_mode = "hc"` (Zhu et al., "Hyper-Connections", ICLR 2025, eqs. 10-13 and Algorithm 2):
static coefficients A_m = pre (one-hot at the sublayer index mod n), A_r = res^T (identity),
B = post (ones); with `hyper_dynamic` each stream adds s_a * tanh(RMSNorm(H_k) W) to its row of
[A_m | A_r] and s_b * tanh(RMSNorm(H_k) w_b) to its B entry, W zero-initialised and s_a = s_b =
0.01 learned scalars.

`hyper_mode = "mhc"` (DeepSeek, "mHC: Manifold-Constrained Hyper-Connections", 2025, eqs. 7-9):
from x = RMSNorm(H flattened to n*D), logits b + a * (x phi) (a linear map, no tanh; a = 0.01
learned per kind, phi zero-initialised when dynamic), then pre = sigmoid, post = 2 sigmoid and
res = Sinkhorn-Knopp(exp(logits)) (20 alternating row / column normalisations, in the log
domain): res is doubly stochastic, so the residual part of the stream keeps its scale over depth.
Our init (not stated in the paper): pre logits 0 on stream (index mod n), -4 elsewhere; res logits
0 on the diagonal, -4 off it; post logits 0 (post = 1).

A new model computes the plain residual in either mode: every stream starts as the embedding, and
both inits keep identical streams identical (rows of res sum to 1, post is 1 everywhere) with the
sublayer seeing a multiple of that stream (pre-norm removes the multiple, exactly at n = 1 in "hc").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .param_init import assign_

SINKHORN_ITERS = 20  # DeepSeek's t_max
DYNAMIC_SCALE_INIT = 0.01  # HC's s_alpha / s_beta, mHC's alpha
MHC_OFF_LOGIT = -4.0


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, D] -> [B, T, n, D]: the embedding feeds every stream."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1])


def collapse_streams(streams: torch.Tensor) -> torch.Tensor:
    """[B, T, n, D] -> [B, T, D]: the streams summed (the paper's read-out)."""
    return streams.sum(dim=-2)


def sinkhorn(logits: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """exp(logits) [..., n, n] projected towards the doubly-stochastic matrices: alternately
    normalise rows and columns (Sinkhorn-Knopp), in the log domain so large logits cannot
    overflow. Columns sum to 1 exactly, rows to within the convergence of `iters` rounds."""
    log = logits
    for _ in range(iters):
        log = log - torch.logsumexp(log, dim=-1, keepdim=True)
        log = log - torch.logsumexp(log, dim=-2, keepdim=True)
    return log.exp()


class HyperConnection(nn.Module):
    """One sublayer's width + depth connection; `forward(streams, sublayer) -> new streams`."""

    def __init__(self, args, sublayer_index: int):
        super().__init__()
        n, dim = args.hyper_streams, args.dim
        self.n, self.mode, self.dynamic = n, args.hyper_mode, args.hyper_dynamic
        self.sublayer_index = sublayer_index
        if self.mode == "hc":
            self.hyper_static_pre = nn.Parameter(torch.empty(n))  # A_m
            self.hyper_static_res = nn.Parameter(torch.empty(n, n))  # A_r [source, destination]
            self.hyper_static_post = nn.Parameter(torch.empty(n))  # B
            if self.dynamic:
                self.norm = nn.RMSNorm(dim, eps=args.norm_eps)  # per stream
                self.proj = nn.Linear(dim, n + 2, bias=False)  # per stream: [A_m | A_r row | B]
                self.hyper_scale_alpha = nn.Parameter(torch.empty(1))
                self.hyper_scale_beta = nn.Parameter(torch.empty(1))
        else:
            self.hyper_static_pre = nn.Parameter(torch.empty(n))  # b_pre
            self.hyper_static_res = nn.Parameter(torch.empty(n, n))  # b_res [destination, source]
            self.hyper_static_post = nn.Parameter(torch.empty(n))  # b_post
            if self.dynamic:
                self.norm = nn.RMSNorm(n * dim, eps=args.norm_eps)  # the flattened streams
                self.proj = nn.Linear(n * dim, 2 * n + n * n, bias=False)  # [phi_pre|phi_post|phi_res]
                self.hyper_scale_pre = nn.Parameter(torch.empty(1))
                self.hyper_scale_post = nn.Parameter(torch.empty(1))
                self.hyper_scale_res = nn.Parameter(torch.empty(1))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        n, chosen = self.n, self.sublayer_index % self.n
        one_hot, eye = torch.eye(n)[chosen], torch.eye(n)
        if self.mode == "hc":
            assign_(self.hyper_static_pre, one_hot)
            assign_(self.hyper_static_res, eye)
            self.hyper_static_post.fill_(1.0)
            scales = ("hyper_scale_alpha", "hyper_scale_beta")
        else:  # logits: 0 where hc has 1, MHC_OFF_LOGIT where it has 0
            assign_(self.hyper_static_pre, (1 - one_hot) * MHC_OFF_LOGIT)
            assign_(self.hyper_static_res, (1 - eye) * MHC_OFF_LOGIT)
            self.hyper_static_post.zero_()
            scales = ("hyper_scale_pre", "hyper_scale_post", "hyper_scale_res")
        if self.dynamic:
            self.norm.reset_parameters()
            self.proj.weight.zero_()
            for name in scales:
                getattr(self, name).fill_(DYNAMIC_SCALE_INIT)

    def coefficients(self, streams: torch.Tensor):
        """(pre [.., n], res [.., n dest, n source], post [.., n]) for streams [B, T, n, D];
        without dynamic coefficients they are the static ones (no batch dims)."""
        n = self.n
        if self.mode == "hc":
            pre, res, post = self.hyper_static_pre, self.hyper_static_res, self.hyper_static_post
            if self.dynamic:
                z = torch.tanh(self.proj(self.norm(streams)))  # [B, T, n source, n + 2]
                pre = pre + self.hyper_scale_alpha * z[..., 0]
                res = res + self.hyper_scale_alpha * z[..., 1:n + 1]
                post = post + self.hyper_scale_beta * z[..., n + 1]
            return pre, res.transpose(-1, -2), post
        pre, res, post = self.hyper_static_pre, self.hyper_static_res, self.hyper_static_post
        if self.dynamic:
            z = self.proj(self.norm(streams.flatten(-2)))  # [B, T, 2n + n^2]
            pre = pre + self.hyper_scale_pre * z[..., :n]
            post = post + self.hyper_scale_post * z[..., n:2 * n]
            res = res + self.hyper_scale_res * z[..., 2 * n:].unflatten(-1, (n, n))
        return torch.sigmoid(pre), sinkhorn(res), 2 * torch.sigmoid(post)

    def forward(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        pre, res, post = self.coefficients(streams)
        dtype = streams.dtype
        pre, res, post = pre.to(dtype), res.to(dtype), post.to(dtype)
        h = (pre.unsqueeze(-2) @ streams).squeeze(-2)  # [B, T, D]
        out = sublayer(h)
        return res @ streams + post.unsqueeze(-1) * out.unsqueeze(-2)


def hyper_mixing_flops_per_token(args) -> float:
    """Training FLOPs per token of the hyper-connections' parameter-free work, all blocks:
    per sublayer the width connection (2 n D), the stream mix (2 n^2 D) and the depth
    connection (2 n D), forward + backward (x3); in "hc" the dynamic projection runs once per
    stream, so its parameters are touched n times where 6 x params counts them once."""
    if args.residual != "hyper":
        return 0.0
    n, dim, sublayers = args.hyper_streams, args.dim, 2 * args.n_layers
    mixing = 3 * (2 * n * dim + 2 * n * n * dim + 2 * n * dim)
    repeated_proj = 6 * (n - 1) * dim * (n + 2) if args.hyper_mode == "hc" and args.hyper_dynamic else 0
    return sublayers * (mixing + repeated_proj)

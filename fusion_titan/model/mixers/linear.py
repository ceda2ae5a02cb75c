"""Linear-attention baseline (`linear`): normalised kernelised causal attention.

Katharopoulos et al. 2020 ("Transformers are RNNs"): q, k, v = W_q x, W_k x, W_v x per head
(n_heads heads of head_dim), phi = elu + 1 (or relu, `linear_feature_map`), and

    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),  S_t = sum_{s<=t} phi(k_s) v_s^T,  z_t = sum_{s<=t} phi(k_s)

then W_o over the heads. No decay, no gate, no positional encoding: the plain baseline the gated
recurrent mixers (gdn, mamba2) are meant to beat. Computed in chunks (ops/linear_attention.py);
decoding keeps the state (S, z) per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...ops.linear_attention import (
    LINEAR_CHUNK, chunked_linear_attention, empty_state, feature_map, linear_attention_step,
)
from ..args import FusionModelArgs
from .registry import register_mixer


@dataclass
class LinearAttentionCache:
    """state: (S [B, H, K, V], z [B, H, K]) in float32 / float64, None before the first token."""

    state: tuple[torch.Tensor, torch.Tensor] | None = None


class LinearAttention(nn.Module):
    def __init__(self, args: FusionModelArgs, eps: float = 1e-6):
        super().__init__()
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.eps = eps
        self.feature_map_name = args.linear_feature_map
        self.phi = feature_map(args.linear_feature_map)
        width = self.n_heads * self.head_dim
        self.wq = nn.Linear(args.dim, width, bias=False)
        self.wk = nn.Linear(args.dim, width, bias=False)
        self.wv = nn.Linear(args.dim, width, bias=False)
        self.wo = nn.Linear(width, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                cache: LinearAttentionCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; document_ids [B, T]: the state restarts at every
        document boundary. `rope` is not used (no positional encoding)."""
        bsz, seqlen, _ = x.shape
        if cache is not None and document_ids is not None:
            raise NotImplementedError("linear: document_ids cannot be combined with a decoding cache")
        shape = (bsz, seqlen, self.n_heads, self.head_dim)
        q = self.phi(self.wq(x).view(shape))
        k = self.phi(self.wk(x).view(shape))
        v = self.wv(x).view(shape)
        if cache is None:
            o, _ = chunked_linear_attention(q, k, v, self.eps, document_ids=document_ids)
        elif seqlen == 1:
            state = cache.state if cache.state is not None else empty_state(q, v)
            o, cache.state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, self.eps)
            o = o[:, None].to(v.dtype)
        else:
            o, cache.state = chunked_linear_attention(q, k, v, self.eps, initial_state=cache.state)
        return self.wo(o.reshape(bsz, seqlen, -1))

    def new_cache(self, batch_size: int, dtype=None, device=None) -> LinearAttentionCache:
        return LinearAttentionCache()  # the state is made by the first forward, in its dtype

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


def linear_flops_per_token(args, seq_len: int) -> float:
    """Chunked form, chunk C, per head of D: C * D for the causal half of the intra-chunk scores,
    C * D for their weighted values (2 FLOPs a multiply-add, half the C keys); 2 * D * D + 2 * D to
    read the carried state (S and z), 2 * D * D + D to add the token to it; x3 for forward +
    backward."""
    c, d = LINEAR_CHUNK, args.head_dim
    return 3 * args.n_heads * (2 * c * d + 4 * d * d + 3 * d)


@register_mixer("linear", family="recurrent", flops_per_token=linear_flops_per_token)
def build_linear_attention(args: FusionModelArgs) -> LinearAttention:
    return LinearAttention(args)

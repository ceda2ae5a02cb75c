"""Gated DeltaNet token mixer (Qwen3-Next style linear attention).

x -> q/k/v projections -> short causal depthwise conv + SiLU -> l2-normalize q, k per head
  -> gated delta rule (state [K, V] per head) -> per-head RMSNorm gated by silu(z) -> o_proj.

The decay g = -exp(A_log) * softplus(a_proj(x) + dt_bias) is Mamba-2's discretized decay
(A < 0, dt > 0) in log space, and beta = sigmoid(b_proj(x)) is the delta-rule write strength.

Only the mixer lives here; the block (pre-norm, residual, FFN) is built elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from ..flops import GDN_CHUNK
from ..short_conv import ShortConv
from ..ssm_init import init_decay_
from .registry import register_mixer


@dataclass
class GDNCache:
    """Inference state of one GatedDeltaNet layer; updated in place by forward.

    conv_states: (q, k, v) tensors [B, conv_size - 1, channels] holding the last conv inputs.
    recurrent_state: [B, H, head_k_dim, head_v_dim] delta-rule state (float32 / float64).
    Both start as None, meaning "empty sequence" (zeros).
    """

    conv_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    recurrent_state: torch.Tensor | None = None


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim, times silu(gate); computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = xf * self.weight.to(xf.dtype) * F.silu(gate.to(xf.dtype))
        return out.to(dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # x / sqrt(sum x^2 + eps), the convention of fla and Qwen3-Next: computed in float32 (float64
    # stays float64) and returned in x's dtype, as fla does. Under autocast (one GPU, no FSDP)
    # pow/sum/rsqrt run in float32 and would otherwise hand float32 q and k to the gated delta
    # rule: its slow float32 path on one GPU, bf16 under FSDP.
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_k_dim: int = 64,
        head_v_dim: int = 128,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        self.dim = dim
        self.n_heads = n_heads
        self.head_k_dim = head_k_dim
        self.head_v_dim = head_v_dim
        self.conv_size = conv_size
        self.backend = backend
        key_dim = n_heads * head_k_dim
        value_dim = n_heads * head_v_dim

        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.a_proj = nn.Linear(dim, n_heads, bias=False)  # decay input (Mamba-2 dt)
        self.b_proj = nn.Linear(dim, n_heads, bias=False)  # beta (write strength)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)  # output gate z

        self.q_conv = ShortConv(key_dim, conv_size)
        self.k_conv = ShortConv(key_dim, conv_size)
        self.v_conv = ShortConv(value_dim, conv_size)

        # Per-head decay parameters; kept in float32-friendly form, usually no weight decay.
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))

        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    def new_cache(self, batch_size: int, dtype=None, device=None) -> GDNCache:
        return GDNCache()  # states are created by the first forward, in the activations' dtype

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, cache: GDNCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; document_ids [B, T] (training on packed documents): the
        short convs and the recurrent state restart at every document boundary."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k_dim, self.head_v_dim
        if document_ids is not None and cache is not None:
            raise NotImplementedError("document_ids cannot be combined with a decoding cache")

        conv_q, conv_k, conv_v = (None, None, None)
        if cache is not None and cache.conv_states is not None:
            conv_q, conv_k, conv_v = cache.conv_states
        q, conv_q = self.q_conv(self.q_proj(x), conv_q, document_ids)
        k, conv_k = self.k_conv(self.k_proj(x), conv_k, document_ids)
        v, conv_v = self.v_conv(self.v_proj(x), conv_v, document_ids)

        q = l2norm(q.view(B, T, H, K))
        k = l2norm(k.view(B, T, H, K))
        v = v.view(B, T, H, V)

        beta = torch.sigmoid(self.b_proj(x))
        # Log decay in float32: g = -exp(A_log) * softplus(a + dt_bias) <= 0.
        gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = -self.A_log.to(gdt).exp() * F.softplus(self.a_proj(x).to(gdt) + self.dt_bias.to(gdt))

        if cache is None:
            o, _ = gated_delta_rule(q, k, v, g, beta, backend=self.backend, document_ids=document_ids)
        else:
            state = cache.recurrent_state
            if T == 1:
                if state is None:
                    state = x.new_zeros(B, H, K, V, dtype=gdt)
                o, state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
                o = o.unsqueeze(1)
            else:
                o, state = gated_delta_rule(
                    q, k, v, g, beta, initial_state=state, output_final_state=True, backend=self.backend
                )
            cache.conv_states = (conv_q, conv_k, conv_v)
            cache.recurrent_state = state

        z = self.g_proj(x).view(B, T, H, V)
        o = self.o_norm(o, z).reshape(B, T, H * V)
        return self.o_proj(o)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float):
        """Input projections ~ N(0, std), the residual output ~ N(0, out_std), truncated at 3 std."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.o_proj.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.reset_parameters()
        self.o_norm.reset_parameters()

        init_decay_(self.A_log, self.dt_bias)  # Mamba-2 / Qwen3-Next ranges


def gdn_flops_per_token(args, seq_len: int) -> float:
    """Chunked form, chunk C, per head: C*(3*d_k + 2*d_v) for the lower-triangular intra-chunk
    products (counted at half, like causal attention) plus 6*d_k*d_v for the state read/update;
    x3 for forward + backward."""
    dk, dv = args.gdn_head_k_dim, args.gdn_head_v_dim
    return 3 * args.gdn_n_heads * (GDN_CHUNK * (3 * dk + 2 * dv) + 6 * dk * dv)


@register_mixer("gdn", family="recurrent", flops_per_token=gdn_flops_per_token)
def build_gated_deltanet(args) -> GatedDeltaNet:
    return GatedDeltaNet(
        args.dim, args.gdn_n_heads, head_k_dim=args.gdn_head_k_dim, head_v_dim=args.gdn_head_v_dim,
        conv_size=args.gdn_conv_size, norm_eps=args.norm_eps, backend=args.gdn_backend,
    )

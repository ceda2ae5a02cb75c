"""Mamba-2 token mixer (legacy option ssm_type = "mamba2"; the default SSM is Gated DeltaNet).

x -> in_proj -> [z, x, B, C, dt]
  [x, B, C] -> short causal depthwise conv (with bias) + SiLU
  dt -> softplus(dt + dt_bias);  A = -exp(A_log)
  y = SSD(x, dt, A, B, C) + D * x          (state [head_dim, d_state] per head)
  y -> gated RMSNorm with silu(z), per group -> out_proj

Differences from state-spaces/mamba's Mamba2: the inner width is given as n_heads * head_dim
instead of expand * dim (pick n_heads = expand * dim // head_dim for the usual expand = 2),
there is no dt_limit / d_ssm / D_has_hdim / learnable initial state, and the SSD is our
pure-PyTorch chunked form (fusion_titan.ops.ssd) rather than the Triton kernels.

Only the mixer lives here; the block (pre-norm, residual, FFN) is built elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.ssd import ssd_chunked, ssd_step
from ..flops import GDN_CHUNK
from ..short_conv import ShortConv
from ..ssm_init import init_decay_
from .registry import register_mixer


@dataclass
class Mamba2Cache:
    """Inference state of one Mamba2 layer; updated in place by forward.

    conv_state: [B, conv_size - 1, inner + 2 * n_groups * d_state], the last conv inputs of [x, B, C].
    ssm_state: [B, n_heads, head_dim, d_state] SSM state (float32 / float64).
    Both start as None, meaning "empty sequence" (zeros).
    """

    conv_state: torch.Tensor | None = None
    ssm_state: torch.Tensor | None = None


class GroupedGatedRMSNorm(nn.Module):
    """RMSNorm with a silu(z) gate, normalized separately over each of n_groups slices; float32.

    Mamba-2 gates first, then normalizes (norm_before_gate=False): rmsnorm(y * silu(z)).
    Normalizing per group (not over the whole inner width) keeps the op local to a
    tensor-parallel shard, which holds whole groups.
    """

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-6, norm_before_gate: bool = False):
        super().__init__()
        assert dim % n_groups == 0
        self.n_groups = n_groups
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.unflatten(-1, (self.n_groups, -1))
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return xg.flatten(-2)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        x, gate = x.to(cdt), F.silu(gate.to(cdt))
        if self.norm_before_gate:
            out = self._rms(x) * self.weight.to(cdt) * gate
        else:
            out = self._rms(x * gate) * self.weight.to(cdt)
        return out.to(dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class Mamba2(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int = 64,
        d_state: int = 128,
        n_groups: int = 1,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        norm_before_gate: bool = False,
    ):
        super().__init__()
        if n_heads % n_groups != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_groups ({n_groups})")
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.d_state = d_state
        self.n_groups = n_groups
        self.conv_size = conv_size
        self.chunk_size = chunk_size
        self.inner = n_heads * head_dim
        self.conv_dim = self.inner + 2 * n_groups * d_state  # conv runs over [x, B, C]

        # One projection for everything, in the order [z, x, B, C, dt].
        self.in_proj = nn.Linear(dim, 2 * self.inner + 2 * n_groups * d_state + n_heads, bias=False)
        self.conv = ShortConv(self.conv_dim, conv_size, bias=True)

        # Per-head SSM parameters; usually excluded from weight decay.
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))

        self.norm = GroupedGatedRMSNorm(self.inner, n_groups, eps=norm_eps, norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(self.inner, dim, bias=False)

    def new_cache(self, batch_size: int, dtype=None, device=None) -> Mamba2Cache:
        return Mamba2Cache()  # states are created by the first forward, in the activations' dtype

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                cache: Mamba2Cache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if document_ids is not None:
            raise NotImplementedError(
                "intra-document masking (document_ids) is implemented for the Gated DeltaNet mixer "
                "only; use [model] ssm_type = \"gdn\" or [data] document_ids = false")
        Bsz, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state

        z, xBC, dt = self.in_proj(x).split([self.inner, self.conv_dim, H], dim=-1)
        xBC, conv_state = self.conv(xBC, cache.conv_state if cache is not None else None)
        xs, Bm, Cm = xBC.split([self.inner, G * N, G * N], dim=-1)
        xs = xs.view(Bsz, T, H, P)
        Bm = Bm.view(Bsz, T, G, N)
        Cm = Cm.view(Bsz, T, G, N)

        # dt and A in float32 (float64 in tests): exp(dt * A) is sensitive to rounding.
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(cdt) + self.dt_bias.to(cdt))
        A = -self.A_log.to(cdt).exp()

        if cache is None:
            y, _ = ssd_chunked(xs, dt, A, Bm, Cm, chunk_size=self.chunk_size)
        else:
            state = cache.ssm_state
            if T == 1:
                if state is None:
                    state = x.new_zeros(Bsz, H, P, N, dtype=cdt)
                y, state = ssd_step(xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], state)
                y = y.unsqueeze(1)
            else:
                y, state = ssd_chunked(
                    xs, dt, A, Bm, Cm, chunk_size=self.chunk_size, initial_state=state, output_final_state=True
                )
            cache.conv_state = conv_state
            cache.ssm_state = state

        y = y + xs * self.D.to(xs.dtype)[:, None]  # skip connection, per head
        y = self.norm(y.reshape(Bsz, T, self.inner), z)
        return self.out_proj(y)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float):
        """in_proj ~ N(0, std), the residual output ~ N(0, out_std), truncated at 3 std."""
        nn.init.trunc_normal_(self.in_proj.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.out_proj.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        self.conv.reset_parameters()
        self.norm.reset_parameters()
        nn.init.ones_(self.D)

        init_decay_(self.A_log, self.dt_bias)  # Mamba-2 / Qwen3-Next ranges


def mamba2_flops_per_token(args, seq_len: int) -> float:
    """SSD, chunk C, per head (2 * dim / head_dim heads): the intra-chunk C*B^T and its product
    with x (causal half), plus the state write and read (2 * p * n each); x3 for fwd + bwd."""
    p, n = args.mamba_head_dim, args.mamba_d_state
    return 3 * (2 * args.dim // p) * (GDN_CHUNK * (n + p) + 4 * p * n)


@register_mixer("mamba2", family="recurrent", flops_per_token=mamba2_flops_per_token)
def build_mamba2(args) -> Mamba2:
    return Mamba2(
        args.dim, n_heads=2 * args.dim // args.mamba_head_dim, head_dim=args.mamba_head_dim,
        d_state=args.mamba_d_state, conv_size=args.gdn_conv_size, norm_eps=args.norm_eps,
    )

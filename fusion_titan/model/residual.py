"""How a block's sublayers (mixer, FFN) join the residual stream (`[model] residual`).

A residual module wraps one sublayer call: `residual(x, sublayer) -> new x`, where `sublayer`
maps the stream to the sublayer's output (pre-norm included). Keeping the call inside lets a
residual form decide what the sublayer sees, not only how its output is added.

- "plain":  x + f(x)
- "scaled": (1 + a) * x + (1 + b) * f(x), a and b learned per dimension and zero-initialised,
            so a new model starts as the plain residual (the 95.7M seed's residual scaling).
- "hyper":  hyper-connections over `hyper_streams` parallel streams (model/hyper_connections.py);
            the trunk widens the stream to [B, T, n, D] and sums it back before the final norm.

Each is built with the sublayer's index in the trunk (2 * layer + 0 for the mixer, + 1 for the
FFN), which hyper-connections use to pick the stream a sublayer reads at init.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .hyper_connections import HyperConnection

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class PlainResidual(nn.Module):
    def __init__(self, args, sublayer_index: int = 0):
        super().__init__()

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return x + sublayer(x)

    def init_weights(self) -> None:
        pass


class ScaledResidual(nn.Module):
    def __init__(self, args, sublayer_index: int = 0):
        super().__init__()
        self.residual_scale = nn.Parameter(torch.zeros(args.dim))
        self.sublayer_scale = nn.Parameter(torch.zeros(args.dim))

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        out = sublayer(x)
        return (1 + self.residual_scale).to(x.dtype) * x + (1 + self.sublayer_scale).to(out.dtype) * out

    def init_weights(self) -> None:
        nn.init.zeros_(self.residual_scale)
        nn.init.zeros_(self.sublayer_scale)


RESIDUALS = {"plain": PlainResidual, "scaled": ScaledResidual, "hyper": HyperConnection}
# residual forms whose trunk carries several streams [B, T, n, D] instead of [B, T, D]
MULTI_STREAM = ("hyper",)


def build_residual(args, sublayer_index: int = 0) -> nn.Module:
    if args.residual not in RESIDUALS:
        raise ValueError(f"[model] residual = {args.residual!r}; choose one of {sorted(RESIDUALS)}")
    return RESIDUALS[args.residual](args, sublayer_index)

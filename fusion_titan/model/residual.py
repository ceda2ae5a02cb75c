"""How a block's sublayers (mixer, FFN) join the residual stream (`[model] residual`).

A residual module wraps one sublayer call: `residual(x, sublayer) -> new x`, where `sublayer`
maps the stream to the sublayer's output (pre-norm included). Keeping the call inside lets a
residual form decide what the sublayer sees, not only how its output is added.

- "plain":  x + f(x)
- "scaled": (1 + a) * x + (1 + b) * f(x), a and b learned per dimension and zero-initialised,
            so a new model starts as the plain residual (the 95.7M seed's residual scaling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class PlainResidual(nn.Module):
    def __init__(self, args):
        super().__init__()

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return x + sublayer(x)

    def init_weights(self) -> None:
        pass


class ScaledResidual(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.residual_scale = nn.Parameter(torch.zeros(args.dim))
        self.sublayer_scale = nn.Parameter(torch.zeros(args.dim))

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        out = sublayer(x)
        return (1 + self.residual_scale).to(x.dtype) * x + (1 + self.sublayer_scale).to(out.dtype) * out

    def init_weights(self) -> None:
        nn.init.zeros_(self.residual_scale)
        nn.init.zeros_(self.sublayer_scale)


RESIDUALS = {"plain": PlainResidual, "scaled": ScaledResidual}


def build_residual(args) -> nn.Module:
    if args.residual not in RESIDUALS:
        raise ValueError(f"[model] residual = {args.residual!r}; choose one of {sorted(RESIDUALS)}")
    return RESIDUALS[args.residual](args)

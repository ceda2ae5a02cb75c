"""The Mamba-2 decay parametrization's init, shared by Gated DeltaNet and Mamba-2."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def init_decay_(A_log: torch.Tensor, dt_bias: torch.Tensor, dt_min: float = 1e-3,
                dt_max: float = 1e-1, a_range: tuple[float, float] = (1.0, 16.0)) -> None:
    """A ~ U(a_range) stored as log (A = exp(A_log) > 0); dt log-uniform in [dt_min, dt_max]
    (floor 1e-4) stored as inverse softplus, so softplus(dt_bias) = dt at init.

    In-place on the parameters, so it works after meta-device construction + to_empty and on
    DTensor shards.
    """
    A_log.uniform_(*a_range).log_()
    dt = dt_bias.uniform_(0.0, 1.0)
    dt.mul_(math.log(dt_max) - math.log(dt_min)).add_(math.log(dt_min)).exp_().clamp_(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

"""torch.optim.Optimizer whose step is one `_step_group(group)` per parameter group."""

from __future__ import annotations

from typing import Callable

import torch


class GroupSteppingOptimizer(torch.optim.Optimizer):
    """Our optimizers (CautiousAdamW, NorMuon / Muon) update each group with a few batched
    kernels, so the step is the closure protocol around `_step_group`."""

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        raise NotImplementedError

"""What an element-wise or matrix optimizer step works on: each rank's local shards.

FSDP2 / expert-parallel parameters are DTensors; their optimizer math runs on the local tensor.
A gradient can arrive placed differently from its parameter (e.g. after a different reduction);
it is moved to the parameter's placements first, so local shards line up element for element.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (the tensor itself when not distributed), for in-place updates
    without autograd: the DTensor's own local tensor, as `to_local()` gives it, except that for
    a Parameter `to_local()` makes a fresh view on every call (one op per parameter per step)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def params_with_grads(group: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, gradient placed like it) for every parameter of `group` that has a gradient."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad
        if isinstance(p, DTensor) and grad.placements != p.placements:
            grad = grad.redistribute(p.device_mesh, p.placements)
        out.append((p, grad))
    return out

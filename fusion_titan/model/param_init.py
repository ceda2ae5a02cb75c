"""Writing a whole initial value into a parameter that FSDP may already have sharded.

torchtitan builds the model on the meta device, shards it (FSDP2: DTensor parameters) and only
then calls init_weights, so `param.copy_(plain_tensor)` fails there ("mixed torch.Tensor and
DTensor"). Random inits (nn.init.*) work on DTensors; structured values go through this.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value (the whole, unsharded value); a DTensor parameter takes its own shard."""
    value = value.to(param.dtype)
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements)
    else:
        value = value.to(param.device)
    param.copy_(value)

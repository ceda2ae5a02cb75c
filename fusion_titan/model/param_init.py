"""Writing whole initial values into parameters that FSDP / expert parallel may already have sharded.

torchtitan builds the model on the meta device, shards it (FSDP2: DTensor parameters) and only
then calls init_weights, so `param.copy_(plain_tensor)` fails there ("mixed torch.Tensor and
DTensor"). Random inits (nn.init.*) work on DTensors; structured values go through `assign_`.

Random inits of DTensors match the whole tensor's only where DTensor's RNG tracker runs (CUDA-like
devices). On CPU ranks every rank draws its shard from the same RNG state, so the halves of a
row-sharded weight come out equal (and experts e and e + n/2 with them). There the model is
initialized whole (`needs_whole_init`, `init_whole_then_keep_shards`): the weights of a one-rank
run with the same seed, whatever the plan.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
# private, but torch's one answer to "does DTensor's RNG cover this mesh" (torch 2.11 and 2.13)
from torch.distributed.tensor._random import is_rng_supported_mesh

# module names that wrappers (torch.compile, activation checkpointing, FSDP1) put into FQNs
_WRAPPERS = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value (the whole, unsharded value); a DTensor parameter takes its own shard."""
    value = value.to(param.dtype)
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements)
    else:
        value = value.to(param.device)
    param.copy_(value)


def needs_whole_init(model: nn.Module) -> bool:
    """True when some parameter is a DTensor on a mesh whose device DTensor's RNG does not cover."""
    return any(isinstance(p, DTensor) and not _rng_supported(p.device_mesh) for p in model.parameters())


def _rng_supported(mesh) -> bool:
    with warnings.catch_warnings():  # it warns on every call where the answer is no
        warnings.simplefilter("ignore")
        return is_rng_supported_mesh(mesh)


@torch.no_grad()
def init_whole_then_keep_shards(model: nn.Module, build_whole: Callable[[], nn.Module],
                                init: Callable[[nn.Module], None]) -> None:
    """Initialize an unsharded twin of `model` (`build_whole` builds it, on the meta device; `init`
    initializes it) and give every parameter of `model` its shard of the twin's value.

    `init` also runs on `model` itself first, for its buffers and non-random state, under a forked
    RNG: the twin's draws start from the state a one-rank run starts from, and the RNG is left
    where that run leaves it. Every rank must hold the same RNG state (torchtitan seeds all ranks
    alike) and call this together (distribute_tensor broadcasts)."""
    with torch.random.fork_rng(devices=[]):
        init(model)
    device = next(p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()).device
    with torch.device("meta"):  # as torchtitan builds it: constructors draw nothing
        twin = build_whole()
    twin.to_empty(device=device)
    init(twin)
    whole = {_WRAPPERS.sub("", name): p for name, p in twin.named_parameters()}
    for name, param in model.named_parameters():
        key = _WRAPPERS.sub("", name)
        if key not in whole or whole[key].shape != param.shape:
            raise RuntimeError(f"whole init: parameter {name} has no twin of shape {tuple(param.shape)}")
        assign_(param, whole.pop(key))

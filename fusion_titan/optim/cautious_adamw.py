"""Cautious AdamW.

AdamW (bias-corrected moments, decoupled weight decay) with two sign masks:

* Cautious update (Liang et al., 2024, "Cautious Optimizers: Improving Training
  with One Line of Code", reference code github.com/kyleliang919/C-Optim): only
  coordinates whose update agrees in sign with the current gradient move,
      mask = (update * grad > 0)
      update = update * mask / max(mean(mask), 1e-3)
  The rescale by the kept fraction keeps the average step size; the 1e-3 floor
  is the reference code's ``mask.mean().clamp(min=1e-3)``.
* Cautious weight decay: decay only coordinates where grad * param > 0, i.e.
  where the gradient step already pushes the weight toward zero:
      param -= lr * weight_decay * param * (grad * param > 0)

Everything is element-wise and runs on the local shard of FSDP2 DTensor
parameters, as foreach (multi-tensor) kernels over all tensors of a group at once. The one
global quantity, mean(mask), is a sum over shards (one all-reduce per mesh for all tensors)
divided by the global element count, so 1 and N ranks give the same step even with uneven shards.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor, Partial

from .group_stepping import GroupSteppingOptimizer
from .local_shards import local, params_with_grads


class CautiousAdamW(GroupSteppingOptimizer):
    """AdamW with cautious update masking and cautious (sign-masked) weight decay.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: (beta1, beta2) of the first and second moments.
        eps: added to the bias-corrected sqrt(second moment).
        weight_decay: decoupled weight decay coefficient.
        cautious: apply the cautious update mask.
        cautious_wd: decay only where grad * param > 0 (False: plain AdamW decay).

    Groups may override every argument except ``params``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        cautious: bool = True,
        cautious_wd: bool = True,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            cautious=cautious, cautious_wd=cautious_wd,
        )
        super().__init__(params, defaults)

    def _step_group(self, group: dict) -> None:
        """One group's step as a few foreach (multi-tensor) kernels over the local shards."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        params, ps, gs, ms, vs, steps = [], [], [], [], [], []
        for p, grad in params_with_grads(group):
            state = self.state[p]
            if not state:
                # Float step on CPU, like torch.optim.AdamW (checkpoint friendly).
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            ps.append(local(p))
            gs.append(local(grad))
            ms.append(local(state["exp_avg"]))
            vs.append(local(state["exp_avg_sq"]))
            steps.append(state["step"].item())
        if not params:
            return

        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        # update = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps), bias corrections per tensor's step
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(ms, [1.0 - beta1**t for t in steps])
        torch._foreach_div_(update, denom)
        del denom

        if group["cautious"]:
            mask = self._positive(update, gs)
            kept = self._global_means(mask, params)
            torch._foreach_mul_(update, mask)
            torch._foreach_div_(update, torch._foreach_clamp_min(kept, 1e-3))
            del mask

        if wd != 0.0:
            if group["cautious_wd"]:
                # Mask from the pre-step weights and this step's gradient.
                decay = self._positive(gs, ps)
                torch._foreach_mul_(decay, ps)
                torch._foreach_add_(ps, decay, alpha=-lr * wd)
                del decay
            else:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
        if any(u.dtype != p.dtype for u, p in zip(update, ps)):
            update = [u.to(p.dtype) for u, p in zip(update, ps)]
        torch._foreach_add_(ps, update, alpha=-lr)

    @staticmethod
    def _positive(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per tensor, 1.0 where a * b > 0 else 0.0 (in a's dtype)."""
        prod = torch._foreach_mul(a, b)
        sign = torch._foreach_sign(prod)
        torch._foreach_clamp_min_(sign, 0.0)
        return sign

    @staticmethod
    def _global_means(masks: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mean of each 0/1 mask over its whole (unsharded) parameter.

        Local sums of all tensors in one stacked vector, ordered so that the DTensor parameters
        of each mesh are one contiguous slice; each such slice adds the other shards' sums with
        one all-reduce (explicit global sum / global count, exact for uneven shards), not one
        per tensor. No index or count tensor is built from Python lists: on CUDA each would be
        a host-to-device copy from pageable memory, which waits for the GPU to drain."""
        meshes: dict[int, int] = {}  # id(mesh) -> order of first appearance
        for p in params:
            if isinstance(p, DTensor):
                meshes.setdefault(id(p.device_mesh), len(meshes))

        def mesh_rank(i: int) -> int:  # plain tensors last
            p = params[i]
            return meshes[id(p.device_mesh)] if isinstance(p, DTensor) else len(meshes)

        order = sorted(range(len(params)), key=mesh_rank)
        sums = torch.stack(torch._foreach_norm([masks[i] for i in order], 1)).float()  # |0/1| = count
        first = 0
        for key, run in itertools.groupby(order, key=mesh_rank):
            last = first + len(list(run))
            if key < len(meshes):
                mesh = params[order[first]].device_mesh
                part = DTensor.from_local(sums[first:last], mesh, [Partial()] * mesh.ndim, run_check=False)
                sums[first:last] = part.full_tensor()
            first = last
        means = torch._foreach_div(list(sums.unbind()), [float(params[i].numel()) for i in order])
        out: list[torch.Tensor] = [means[0]] * len(params)
        for j, i in enumerate(order):
            out[i] = means[j]
        return out

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
parameters. The one global quantity, mean(mask), is computed as a DTensor sum
(all-reduce over the mesh) divided by the global element count, so 1 and N ranks
give the same step even with uneven shards.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class CautiousAdamW(torch.optim.Optimizer):
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

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if isinstance(p, DTensor) and grad.placements != p.placements:
                    grad = grad.redistribute(p.device_mesh, p.placements)

                state = self.state[p]
                if not state:
                    # Float step on CPU, like torch.optim.AdamW (checkpoint friendly).
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()

                # Element-wise math on this rank's shard.
                p_l, g_l = _local(p), _local(grad)
                m_l, v_l = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                m_l.lerp_(g_l, 1.0 - beta1)
                v_l.mul_(beta2).addcmul_(g_l, g_l, value=1.0 - beta2)

                bc1 = 1.0 - beta1**t
                bc2 = 1.0 - beta2**t
                denom = (v_l.sqrt() / math.sqrt(bc2)).add_(eps)
                update = (m_l / bc1) / denom

                if group["cautious"]:
                    mask = (update * g_l > 0).to(update.dtype)
                    kept = self._global_mean(mask, p).clamp(min=1e-3)
                    update = update * mask / kept

                if wd != 0.0:
                    if group["cautious_wd"]:
                        # Mask from the pre-step weights and this step's gradient.
                        decay_mask = (g_l * p_l > 0).to(p_l.dtype)
                        p_l.sub_(p_l * decay_mask, alpha=lr * wd)
                    else:
                        p_l.mul_(1.0 - lr * wd)
                p_l.add_(update.to(p_l.dtype), alpha=-lr)

        return loss

    @staticmethod
    def _global_mean(mask_local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Mean of the mask over the whole (unsharded) parameter."""
        if not isinstance(p, DTensor):
            return mask_local.mean()
        mask = DTensor.from_local(
            mask_local, p.device_mesh, p.placements,
            run_check=False, shape=p.shape, stride=p.stride(),
        )
        # Explicit global sum / global count: a partial sum per shard that
        # full_tensor() all-reduces, exact for uneven shards and any mesh.
        return mask.sum().full_tensor() / p.numel()

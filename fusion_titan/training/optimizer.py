"""TrainSpec.build_optimizers_fn: the optimizer container plus our per-step hooks.

Hooks, in order around `optimizers.step()`:
- pre-step: close the step's loss record and refuse to step on a non-finite loss part;
- post-step: move the MoE selection biases from the step's expert loads (aux-loss-free balancing).
"""

from __future__ import annotations

import torch.nn as nn

from torchtitan.components.optimizer import OptimizersContainer, build_optimizers as build_torchtitan_optimizers

from .loss import STEP_LOSSES, check_finite
from .moe_balance import ExpertBiasUpdater

TORCHTITAN_OPTIMIZERS = ("Adam", "AdamW")


def _last_step(optimizers: OptimizersContainer) -> int | None:
    """Steps taken so far, read from optimizer state (so it survives a resume)."""
    for opt in optimizers:
        for state in opt.state.values():
            if "step" in state:
                return int(state["step"])
    return None


def build_optimizers(model_parts: list[nn.Module], optimizer_config, parallel_dims,
                     ft_manager=None) -> OptimizersContainer:
    name = optimizer_config.name
    if name in TORCHTITAN_OPTIMIZERS:
        optimizers = build_torchtitan_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    else:
        raise ValueError(
            f"[optimizer] name = {name!r} is not supported; use one of {TORCHTITAN_OPTIMIZERS}"
        )

    def finish_step(*args, **kwargs):
        last = _last_step(optimizers)
        check_finite(STEP_LOSSES.finish_step(), None if last is None else last + 1)

    optimizers.register_step_pre_hook(finish_step)

    loss_mesh = parallel_dims.get_optional_mesh("loss")
    updater = ExpertBiasUpdater(model_parts, loss_mesh.get_group() if loss_mesh is not None else None)
    optimizers.register_step_post_hook(updater)
    optimizers.expert_bias_updater = updater  # read by the metrics processor
    return optimizers

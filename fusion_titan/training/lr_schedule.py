"""TrainSpec.build_lr_schedulers_fn: torchtitan's warmup-stable-decay, plus warmup as a fraction.

torchtitan 0.2.2 already implements WSD (`warmup_steps`, `decay_ratio`, `decay_type`
linear/sqrt/cosine, `min_lr_factor`); it only lacks a warmup given as a fraction of the run, which
the recipe's default (1% warmup, 84% stable, 15% decay) needs. `[lr_scheduler] warmup_fraction`
turns into warmup_steps here and everything else is torchtitan's.
"""

from __future__ import annotations

import dataclasses

from torchtitan.components.lr_scheduler import LRSchedulersContainer, build_lr_schedulers as build_wsd
from torchtitan.tools.logging import logger


def build_lr_schedulers(optimizers, lr_scheduler_config, training_steps: int) -> LRSchedulersContainer:
    fraction = getattr(lr_scheduler_config, "warmup_fraction", None)
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"[lr_scheduler] warmup_fraction must be in [0, 1), got {fraction}")
        total = lr_scheduler_config.total_steps or training_steps
        warmup = max(1, round(fraction * total)) if fraction > 0 else 0
        logger.info(f"warmup_fraction {fraction} of {total} steps -> warmup_steps {warmup}")
        lr_scheduler_config = dataclasses.replace(lr_scheduler_config, warmup_steps=warmup)
    return build_wsd(optimizers, lr_scheduler_config, training_steps)

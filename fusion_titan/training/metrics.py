"""torchtitan's metrics processor plus what a hybrid-MoE run needs watched.

Adds, at each log step: the loss split into CE / per-depth MTP (+ MTP top-1 accuracy), the
learning rate of every parameter group, and expert-load statistics of the last optimizer step.
Values go to the console and to TensorBoard/W&B through torchtitan's logger.
"""

from __future__ import annotations

import torch

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from .loss import STEP_LOSSES


class FusionMetricsProcessor(MetricsProcessor):
    def _loss_parts(self) -> dict[str, float]:
        parts = dict(STEP_LOSSES.finished)
        if not parts:
            return {}
        names = sorted(parts)
        flat = torch.cat([parts[n].reshape(-1).float() for n in names])
        mesh = self.parallel_dims.get_optional_mesh("loss")
        if mesh is not None:
            torch.distributed.all_reduce(flat, group=mesh.get_group())
        sizes = [parts[n].numel() for n in names]
        summed = dict(zip(names, flat.split(sizes)))
        tokens = summed["tokens"].item()
        out = {"loss_metrics/ce": summed["ce"].item() / tokens, "data/tokens_per_step": tokens}
        if "moe_aux" in summed:
            out["loss_metrics/moe_balance"] = summed["moe_aux"].item() / tokens
        if "z" in summed:
            out["loss_metrics/z_loss"] = summed["z"].item() / tokens
        if "mtp" in summed:
            n_k = summed["mtp_tokens"].clamp_min(1)
            for k, loss_k in enumerate((summed["mtp"] / n_k).tolist(), start=1):
                out[f"loss_metrics/mtp_{k}"] = loss_k
            if "mtp_correct" in summed:
                for k, acc_k in enumerate((summed["mtp_correct"] / n_k).tolist(), start=1):
                    out[f"loss_metrics/mtp_{k}_acc"] = acc_k
        return out

    def _learning_rates(self) -> dict[str, float]:
        out = {}
        optimizers = getattr(self, "optimizers", None)
        if optimizers is None:
            return out
        groups = [g for opt in optimizers for g in opt.param_groups]  # the scheduled ones
        for i, group in enumerate(groups):
            out[f"lr/{group.get('name', f'group{i}')}"] = float(group["lr"])
        return out

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = dict(extra_metrics or {})
        extra.update(self._loss_parts())
        extra.update(self._learning_rates())
        updater = getattr(getattr(self, "optimizers", None), "expert_bias_updater", None)
        if updater is not None:
            extra.update(updater.metrics())
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        shown = {k.split("/")[-1]: v for k, v in extra.items()
                 if k.startswith(("loss_metrics/", "moe/", "data/"))}
        if shown:
            logger.info(f"step: {step:2}  " + "  ".join(f"{k}: {v:.4f}" for k, v in shown.items()))


def build_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return FusionMetricsProcessor(job_config, parallel_dims, tag)

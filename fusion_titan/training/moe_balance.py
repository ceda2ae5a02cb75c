"""Aux-loss-free MoE balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2): the bias update.

After each optimizer step, every MoE layer's selection bias moves by `rate * sign(mean load -
load)`: overloaded experts become less likely to be picked, idle ones more. Loads are summed over
the step's micro-batches and over all data-parallel ranks first, so every rank applies the same
update. Gate weights never see the bias, and autograd never touches it. Routers without a
selection bias (`uses_expert_bias = False`, e.g. softmax_topk) are skipped; their load is still
counted for the metrics.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.moe import DeepSeekMoE, load_metrics, moe_load_counters


def moe_layers(model_parts: list[nn.Module]) -> list[DeepSeekMoE]:
    return [m for part in model_parts for m in part.modules() if isinstance(m, DeepSeekMoE)]


class ExpertBiasUpdater:
    """Optimizer post-step hook; also keeps the last step's load for the metrics."""

    def __init__(self, model_parts: list[nn.Module], process_group=None, ep_degree: int = 1):
        self.layers = moe_layers(model_parts)
        self.process_group = process_group
        self.ep_degree = ep_degree  # for the per-EP-rank load metrics
        self.last_load: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> None:
        if not self.layers:
            return
        # one all-reduce for loads and dropped counts of every layer
        load, dropped = moe_load_counters(self.layers)
        counts = torch.cat([load, dropped.unsqueeze(1)], dim=1)
        if self.process_group is not None:
            torch.distributed.all_reduce(counts, group=self.process_group)
        load, self.last_dropped = counts[:, :-1], counts[:, -1]
        self.last_load = load
        for m, layer_load in zip(self.layers, load):
            if m.bias_update_rate > 0 and m.router.uses_expert_bias:
                m.expert_bias.add_(m.bias_update_rate * torch.sign(layer_load.mean() - layer_load))
            m.reset_load_counters()

    def metrics(self) -> dict[str, float]:
        if self.last_load is None:
            return {}
        return load_metrics(self.last_load, self.last_dropped, ep_degree=self.ep_degree)

"""TrainSpec.build_optimizers_fn: the optimizer container plus our per-step hooks.

`[optimizer] name`:
- "NorMuon": NorMuon for hidden matrices + CautiousAdamW for the rest, one optimizer per model
  part (fusion_titan.optim.hybrid), groups from fusion_titan.training.param_groups;
- "Muon": plain Muon for the same hidden matrices + torch's AdamW for the rest;
- "AdamW" / "Adam": torch's optimizer over the same groups (muP lr multipliers, no decay on
  vectors and the embedding) — the baseline.
In both, the Engram tables (model/engram.py) are an Adam group of their own, "engram", at
`[optimizer] engram_lr` (default: lr) without weight decay.

Hooks, in order around `optimizers.step()`:
- pre-step: close the step's loss record (the loss function refuses a non-finite part before its
  backward, training/loss.py);
- post-step: move the MoE selection biases from the step's expert loads (aux-loss-free balancing).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer

from ..optim import CautiousAdamW, Muon, NorMuon
from ..optim.hybrid import HybridOptimizer
from .loss import STEP_LOSSES
from .moe_balance import ExpertBiasUpdater
from .param_groups import groups_by_multiplier, lr_multipliers, split_named_params

OPTIMIZERS = ("NorMuon", "Muon", "AdamW", "Adam")


class FusionOptimizersContainer(OptimizersContainer):
    """torchtitan's container (DCP state, hooks, LR scheduling), with our param groups per part."""

    def __init__(self, model_parts: list[nn.Module], make_optimizer, defaults: dict) -> None:
        self.model_parts = model_parts
        self.optimizers = [make_optimizer(part) for part in model_parts]
        all_params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self._validate_length(len(model_parts))
        self._post_init(all_params, defaults)


def _groups(model: nn.Module, cfg, matrix_rule: str | None) -> tuple[list[dict], list[dict]]:
    """(matrix-rule groups, Adam groups); muP's per-matrix lr in groups by multiplier (param_groups).

    matrix_rule: the name of the rule training the hidden matrices ("normuon", "muon"; it names
    their groups), or None when Adam trains everything.
    """
    named = split_named_params(model)
    separate = matrix_rule is not None
    mults = lr_multipliers(model, getattr(cfg, "muon_update_scale", "muon") if separate else None)
    hidden = named["adam_matrix"] + ([] if separate else named["muon"])
    adam = [
        {"params": [p for _, p in named["embedding"]], "lr": cfg.lr, "weight_decay": 0.0,
         "name": "embedding"},
        *groups_by_multiplier(hidden, mults, cfg.lr, cfg.weight_decay, "adam_hidden"),
        {"params": [p for _, p in named["no_decay"]], "lr": cfg.lr, "weight_decay": 0.0,
         "name": "vectors"},
        # Engram n-gram tables: lookups like the embedding, with a learning rate of their own
        {"params": [p for _, p in named["engram_table"]], "weight_decay": 0.0, "name": "engram",
         "lr": cfg.lr if getattr(cfg, "engram_lr", None) is None else cfg.engram_lr},
    ]
    muon = groups_by_multiplier(named["muon"], mults, cfg.muon_lr, cfg.muon_weight_decay,
                                matrix_rule) if separate else []
    keep = lambda gs: [g for g in gs if g["params"]]  # noqa: E731
    return keep(muon), keep(adam)


def _adam_kernel(cfg, model: nn.Module) -> dict:
    """torch AdamW / Adam kwargs selecting `[optimizer] implementation` (fused is CUDA-only here)."""
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(cfg.implementation, {})
    on_cpu = next(model.parameters()).device.type == "cpu"
    return {} if on_cpu and impl.get("fused") else impl


def _optimizer_factory(cfg):
    name = cfg.name
    if name == "NorMuon":
        # torch's for-loop / foreach / fused kernels exist only for AdamW / Adam; NorMuon and its
        # CautiousAdamW have one implementation. torchtitan's default cannot be told from unset.
        from torchtitan.config.job_config import Optimizer as TorchtitanOptimizer

        if cfg.implementation != TorchtitanOptimizer.implementation:
            raise ValueError(
                f"[optimizer] implementation = {cfg.implementation!r} has no effect with name = "
                "\"NorMuon\" (NorMuon and CautiousAdamW have a single implementation of their own): "
                "remove the implementation key from the TOML (or pass --optimizer.implementation "
                f"{TorchtitanOptimizer.implementation}, torchtitan's default), or use name = "
                "\"AdamW\" / \"Adam\" / \"Muon\", whose torch for-loop / foreach / fused kernels it selects"
            )

        def make(model):
            muon, adam = _groups(model, cfg, "normuon")
            return HybridOptimizer({
                "normuon": NorMuon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                   beta2=cfg.muon_beta2, eps=cfg.eps,
                                   weight_decay=cfg.muon_weight_decay, ns_steps=cfg.ns_steps,
                                   update_scale=cfg.muon_update_scale,
                                   bucket_mb=cfg.muon_bucket_mb) if muon else None,
                "adamw": CautiousAdamW(adam, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                       weight_decay=cfg.weight_decay) if adam else None,
            })
        return make
    if name == "Muon":
        def make(model):
            muon, adam = _groups(model, cfg, "muon")
            return HybridOptimizer({
                "muon": Muon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                             weight_decay=cfg.muon_weight_decay, ns_steps=cfg.ns_steps,
                             update_scale=cfg.muon_update_scale,
                             bucket_mb=cfg.muon_bucket_mb) if muon else None,
                # the AdamW of torch (implementation picks its kernel), as Keller Jordan's Muon
                "adamw": torch.optim.AdamW(adam, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                                           **_adam_kernel(cfg, model)) if adam else None,
            })
        return make
    if name in ("AdamW", "Adam"):
        cls = torch.optim.AdamW if name == "AdamW" else torch.optim.Adam

        def make(model):
            _, adam = _groups(model, cfg, None)
            return cls(adam, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                       weight_decay=cfg.weight_decay, **_adam_kernel(cfg, model))
        return make
    raise ValueError(f"[optimizer] name = {name!r} is not supported; use one of {OPTIMIZERS}")


def _last_step(optimizers: OptimizersContainer) -> int | None:
    """Steps taken so far, read from optimizer state (so it survives a resume)."""
    for opt in optimizers:
        for state in opt.state.values():
            if "step" in state:
                return int(state["step"])
    return None


def build_optimizers(model_parts: list[nn.Module], optimizer_config, parallel_dims,
                     ft_manager=None) -> OptimizersContainer:
    if optimizer_config.early_step_in_backward:
        raise NotImplementedError("[optimizer] early_step_in_backward is not supported by fusion_titan")
    optimizers = FusionOptimizersContainer(
        model_parts, _optimizer_factory(optimizer_config), {"lr": optimizer_config.lr}
    )

    taking: list[int] = []  # the step being taken, counted on the host after the first read

    def finish_step(*args, **kwargs):
        # No host read here but the first step's (the loss function checks each micro-batch's
        # parts after its forward), so the optimizer's launches overlap the backward still
        # running on the GPU: the step count is read from the (restored) optimizer state once.
        STEP_LOSSES.finish_step()
        if not taking:
            taking.append((_last_step(optimizers) or 0) + 1)
        else:
            taking[0] += 1

    def next_step() -> int:
        """The step the current loss parts belong to (for an error message only)."""
        return taking[0] + 1 if taking else (_last_step(optimizers) or 0) + 1

    optimizers.register_step_pre_hook(finish_step)
    STEP_LOSSES.step_source = next_step

    loss_mesh = parallel_dims.get_optional_mesh("loss")
    updater = ExpertBiasUpdater(model_parts, loss_mesh.get_group() if loss_mesh is not None else None,
                                ep_degree=parallel_dims.ep)
    optimizers.register_step_post_hook(updater)
    optimizers.expert_bias_updater = updater  # read by the metrics processor
    return optimizers

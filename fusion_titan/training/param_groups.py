"""Which parameters get which optimizer rule, learning rate and weight decay.

- NorMuon: matrices of the hidden layers (ndim >= 2; MoE experts [E, out, in] per expert), i.e.
  not the tied embedding/head, not the router gate (its rows are expert scores, not features),
  and not the short depthwise conv kernels.
- CautiousAdamW / AdamW: everything else; 1-D parameters (norm gains, A_log, dt_bias, D) and the
  hyper-connections' static coefficients (`hyper_static_*`, [n] / [n, n]) without weight decay;
  the hyper-connections' dynamic projections (in `*_residual.`) are Adam matrices: tiny
  coefficient maps, not features.
- Engram tables (`engrams.<i>.table.weight`): their own Adam group ("engram", `[optimizer]
  engram_lr`, no weight decay), like the vocabulary embedding a lookup table.
- muP, per matrix (fusion_titan/model/mup.py): an Adam-trained matrix with fan-in multiplier m
  (fan_in / the base model's) gets lr / m and weight decay x m (mup's MuAdam); a NorMuon matrix
  gets the spectral-condition multiplier of its shape (`spectral_lr_multiplier`), its weight
  decay divided by the same factor. The embedding/head and vectors keep the base lr. Matrices
  with the same multiplier share one param group.
"""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from ..model.engram import is_engram_table
from ..model.mup import base_shapes, fan_in_multipliers, spectral_lr_multiplier

# name fragments of matrices kept out of NorMuon: the tied embedding/head, router gates, and the
# short depthwise conv kernels (q_conv/k_conv/v_conv of GDN, conv of Mamba-2)
ADAM_MATRIX_NAMES = ("tok_embeddings", "router.gate", "conv", "_residual.")
ROLES = ("muon", "adam_matrix", "embedding", "engram_table", "no_decay")


def is_muon_param(name: str, p) -> bool:
    return p.ndim >= 2 and not any(key in name for key in ADAM_MATRIX_NAMES)


def role(name: str, p) -> str:
    if p.ndim < 2 or "hyper_static_" in name:
        return "no_decay"
    if "tok_embeddings" in name:
        return "embedding"
    if is_engram_table(name):
        return "engram_table"
    return "muon" if is_muon_param(name, p) else "adam_matrix"


def split_named_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{role: [(name, parameter)]} for every trainable parameter."""
    groups = {r: [] for r in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[role(name, p)].append((name, p))
    return groups


def split_params(model: nn.Module) -> dict[str, list]:
    return {r: [p for _, p in named] for r, named in split_named_params(model).items()}


def lr_multipliers(model: nn.Module, muon_update_scale: str | None = None) -> dict[str, float]:
    """{parameter name: lr multiplier} under muP: 1 / fan-in multiplier for Adam matrices, the
    spectral multiplier for NorMuon matrices (when muon_update_scale is given, i.e. NorMuon
    trains them), 1 for the embedding and vectors and for everything when muP is off or the
    model has no `model_args`."""
    args = getattr(model, "model_args", None)
    named = split_named_params(model)
    mults = {name: 1.0 for params in named.values() for name, _ in params}
    if args is None or not args.mup:
        return mults
    base = base_shapes(model, args)
    fan_in = fan_in_multipliers(model, args, base)
    for name, p in named["adam_matrix"] + named["muon"]:
        if muon_update_scale is not None and role(name, p) == "muon":
            mults[name] = spectral_lr_multiplier(p.shape, base[name], muon_update_scale)
        else:
            mults[name] = 1.0 / fan_in[name]
    return mults


def groups_by_multiplier(named: list[tuple[str, nn.Parameter]], mults: dict[str, float],
                         lr: float, weight_decay: float, name: str) -> list[dict]:
    """One param group per distinct lr multiplier k: lr * k and weight_decay / k (so the decay
    per step, lr * weight_decay, is the same for every width). Named `name` for k = 1, else
    `name/lr_x{k}`."""
    by_mult = defaultdict(list)
    for param_name, p in named:
        by_mult[round(mults[param_name], 12)].append(p)
    return [{"params": params, "lr": lr * k, "weight_decay": weight_decay / k,
             "name": name if k == 1.0 else f"{name}/lr_x{k:.6g}"}
            for k, params in sorted(by_mult.items(), reverse=True)]

"""muP by each matrix's own fan-in, as microsoft/mup's `set_base_shapes` derives it.

mup compares every parameter's shape with the same parameter in a base model: a dimension that
differs is a width dimension, and a matrix's width multiplier is its fan-in's (`fan_in /
base_fan_in`; 1 when the fan-in is a fixed dimension). Here the base model is
`FusionModelArgs.mup_base()` built on the meta device, and per matrix with multiplier m:

  init std  = base std / sqrt(m)     (init variance ~ 1 / fan_in)
  Adam lr   = lr / m,  weight decay x m (mup's MuAdam: lr * wd, the per-step decay, stays fixed)

A matrix whose fan-in does not grow (MLA's wq_b / wkv_b: q/kv LoRA rank; the short conv
kernels: conv size) keeps its base init and lr. Vectors keep both. The tied embedding's fan-in
is the vocabulary (fixed): base init and lr; as the head it is mup's MuSharedReadout, logits
times 1 / width_mult (`FusionModel.logit_scale`). NorMuon's lr per matrix:
`spectral_lr_multiplier`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .args import FusionModelArgs

EMBEDDING = "tok_embeddings.weight"
# path components that activation checkpointing, torch.compile and FSDP1 add to parameter names
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def plain_name(name: str) -> str:
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def fan_in(name: str, shape) -> int:
    """Inputs feeding one output: the last dim of nn.Linear [out, in], the experts' [E, out, in]
    and the depthwise convs' [channels, kernel]; the vocabulary for the embedding [vocab, dim]."""
    return shape[0] if plain_name(name) == EMBEDDING else shape[-1]


def base_shapes(model: nn.Module, args: FusionModelArgs | None = None) -> dict[str, torch.Size]:
    """{parameter name (as model.named_parameters gives it): the same parameter's shape in the
    base model `args.mup_base()`} (built on the meta device). Works on a pipeline stage or a
    wrapped model: names are matched without wrapper components, shapes are global (DTensor)."""
    from .model import FusionModel

    args = args or model.model_args
    with torch.device("meta"):
        base = dict(FusionModel(args.mup_base()).named_parameters())
    shapes = {}
    for name, _ in model.named_parameters():
        key = plain_name(name)
        if key not in base:
            raise KeyError(f"{key} has no counterpart in the muP base model")
        shapes[name] = base[key].shape
    return shapes


def fan_in_multipliers(model: nn.Module, args: FusionModelArgs | None = None,
                       base: dict[str, torch.Size] | None = None) -> dict[str, float]:
    """{parameter name: fan_in / base fan_in} for matrices, 1 for vectors; all 1 when muP is off.
    `base`: `base_shapes(model, args)` when the caller already has them."""
    args = args or model.model_args
    params = list(model.named_parameters())
    if not args.mup:
        return {name: 1.0 for name, _ in params}
    base = base or base_shapes(model, args)
    return {name: fan_in(name, p.shape) / fan_in(name, base[name]) if p.ndim >= 2 else 1.0
            for name, p in params}


@torch.no_grad()
def rescale_init_(model: nn.Module, args: FusionModelArgs | None = None) -> None:
    """Turn the base-model init every module just drew into muP's: each matrix times
    1 / sqrt(its fan-in multiplier) (mup's `init.normal_` / `_rescale_parameters`)."""
    mults = fan_in_multipliers(model, args)
    for name, p in model.named_parameters():
        mult = mults[name]
        if mult != 1.0:
            p.mul_(mult ** -0.5)


def spectral_lr_multiplier(shape, base_shape, update_scale: str) -> float:
    """NorMuon's lr multiplier for one matrix [.., out, in] relative to its base shape.

    muP for an orthogonalized optimizer is the spectral condition (Yang, Simon & Bernstein 2023,
    "A spectral condition for feature learning"): the update's spectral norm must scale as
    sqrt(fan_out / fan_in). NorMuon's update has singular values ~ sqrt(max(1, out / in)) per unit
    lr with update_scale "muon" (Keller Jordan's shape factor), and ~ sqrt(max(out, in)) with
    "adamw" (entries of RMS 0.2 lr). The lr multiplier is the ratio of what is wanted to what the
    update gives, relative to the base shape: 1 for every matrix whose out/in ratio is fixed
    under "muon"; 1/sqrt(m) for square hidden matrices under "adamw".
    """
    def per_unit_lr(out: int, inp: int) -> float:
        wanted = math.sqrt(out / inp)
        given = math.sqrt(max(1.0, out / inp)) if update_scale == "muon" else math.sqrt(max(out, inp))
        return wanted / given

    return per_unit_lr(*shape[-2:]) / per_unit_lr(*base_shape[-2:])

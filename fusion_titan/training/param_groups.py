"""Which parameters get which optimizer rule, learning rate and weight decay.

- NorMuon: matrices of the hidden layers (ndim >= 2; MoE experts [E, out, in] per expert), i.e.
  not the tied embedding/head, not the router gate (its rows are expert scores, not features),
  and not the short depthwise conv kernels.
- CautiousAdamW / AdamW: everything else; 1-D parameters (norm gains, A_log, dt_bias, D) without
  weight decay.
- muP (Tensor Programs V, Adam rule): hidden matrices trained by Adam get lr / width_mult; the
  embedding/head and vectors keep the base lr. NorMuon's orthogonalized update is already
  width-aware (spectral scaling), so its lr is not multiplied.
"""

from __future__ import annotations

import torch.nn as nn

# name fragments of matrices kept out of NorMuon: the tied embedding/head, router gates, and the
# short depthwise conv kernels (q_conv/k_conv/v_conv of GDN, conv of Mamba-2)
ADAM_MATRIX_NAMES = ("tok_embeddings", "router.gate", "conv")


def is_muon_param(name: str, p) -> bool:
    return p.ndim >= 2 and not any(key in name for key in ADAM_MATRIX_NAMES)


def split_params(model: nn.Module) -> dict[str, list]:
    groups = {"muon": [], "adam_matrix": [], "embedding": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            groups["no_decay"].append(p)
        elif name.startswith("tok_embeddings"):
            groups["embedding"].append(p)
        elif is_muon_param(name, p):
            groups["muon"].append(p)
        else:
            groups["adam_matrix"].append(p)
    return groups

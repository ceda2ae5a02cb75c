"""One pre-norm residual block of the trunk: a token mixer, then a feed-forward.

The block is composed from three tables, never an if/else on kinds: the mixer from the mixer
registry (fusion_titan/model/mixers), the FFN from fusion_titan/model/ffn.py, the residual form
from fusion_titan/model/residual.py. `[model] layer_pattern` (model/layer_pattern.py) says
which mixer and FFN each layer gets.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .args import FusionModelArgs
from .ffn import FFNS, default_ffn
from .layer_pattern import LayerSpec
from .mixers import mixer_kind
from .residual import build_residual


def init_stds(args: FusionModelArgs) -> tuple[float, float]:
    """(std of input-side matrices, std of residual-output matrices) in the muP base model.

    Residual outputs are scaled by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream's scale
    does not grow with depth. muP's per-matrix width scaling is applied afterwards, by
    FusionModel.init_weights (fusion_titan/model/mup.py): every matrix here is drawn as the base
    model would draw it.
    """
    return args.init_std, args.init_std / math.sqrt(2 * args.n_layers)


class FusionBlock(nn.Module):
    def __init__(self, spec: LayerSpec | str, args: FusionModelArgs, layer_index: int = 0):
        super().__init__()
        spec = LayerSpec(spec) if isinstance(spec, str) else spec
        kind = mixer_kind(spec.mixer)
        self.kind = spec.mixer
        self.ffn_kind = spec.ffn or default_ffn(kind.family, args)
        if self.ffn_kind not in FFNS:
            raise ValueError(f"unknown FFN kind {self.ffn_kind!r} in block {spec.mixer}+{spec.ffn}; "
                             f"valid FFN kinds: {sorted(FFNS)}")
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mixer = kind.build(args)
        # `moe_enabled` / `moe` are the names torchtitan's MoE helpers look for.
        self.moe_enabled = self.ffn_kind == "moe"
        ffn = FFNS[self.ffn_kind](args)
        if self.moe_enabled:
            self.moe = ffn
        else:
            self.feed_forward = ffn
        self.mixer_residual = build_residual(args, 2 * layer_index)
        self.ffn_residual = build_residual(args, 2 * layer_index + 1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim] ([B, T, n, dim] -> same with n hyper-connection streams).

        `cache` (decoding only) is this block's mixer cache (mixer.new_cache(); see
        fusion_titan.model.decoding); x is then the next chunk and the cache is updated in place.
        The FFN / MoE is per-token and needs none.

        `document_ids` [B, T] (training on packed documents): no token mixes with another
        document — attention is masked, the recurrent mixers restart at each boundary.
        """
        x = self.mixer_residual(x, lambda h: self.mixer(
            self.attention_norm(h), rope, cache=cache, document_ids=document_ids))
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return self.ffn_residual(x, lambda h: ffn(self.ffn_norm(h)))

    def init_weights(self, args: FusionModelArgs, buffer_device: torch.device | None = None) -> None:
        std, out_std = init_stds(args)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.mixer.init_weights(std, out_std)
        self.mixer_residual.init_weights()
        self.ffn_residual.init_weights()
        if self.moe_enabled:
            self.moe.init_weights(std, out_std, buffer_device)
        else:
            for lin, s in ((self.feed_forward.w1, std), (self.feed_forward.w3, std),
                           (self.feed_forward.w2, out_std)):
                nn.init.trunc_normal_(lin.weight, std=s, a=-3 * s, b=3 * s)

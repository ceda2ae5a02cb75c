"""`block_sparse`: softmax attention over local blocks plus global tokens.

The `attn` mixer (mixers/attn.py: GQA, QK-norm, gate, partial RoPE) with a block-sparse causal
mask (fusion_titan/ops/block_sparse_attention.py): a query in block b (blocks of
`block_sparse_block` tokens) sees, causally, the keys of its own block and of the
`block_sparse_local - 1` previous blocks, plus the first `block_sparse_global` tokens of the
sequence (Longformer / BigBird's sliding blocks + global tokens, without random blocks).
FlexAttention's BlockMask skips the masked tiles on GPU; CPU runs the dense boolean mask.

Decoding keeps the whole KV cache (the global tokens stay visible forever) and masks it densely.
"""

from __future__ import annotations

from ...ops.block_sparse_attention import block_sparse_attention, block_sparse_keys_per_query
from ..args import FusionModelArgs
from .attn import SoftmaxAttention, softmax_attention_flops
from .registry import register_mixer


class BlockSparseAttention(SoftmaxAttention):
    def __init__(self, args: FusionModelArgs):
        super().__init__(args)
        for name in ("block_sparse_block", "block_sparse_local"):
            if getattr(args, name) < 1:
                raise ValueError(f"[model] {name} must be >= 1 for the block_sparse mixer, got {getattr(args, name)}")
        if args.block_sparse_global < 0:
            raise ValueError(f"[model] block_sparse_global must be >= 0, got {args.block_sparse_global}")
        self.block = args.block_sparse_block
        self.local = args.block_sparse_local
        self.n_global = args.block_sparse_global

    @property
    def cache_keep_last(self) -> int:
        return 0  # global tokens are visible from every later position

    def attend(self, q, k, v, document_ids=None, backend: str | None = None):
        return block_sparse_attention(q, k, v, self.block, self.local, self.n_global,
                                      scale=self.softmax_scale, backend=backend or self.backend,
                                      document_ids=document_ids)


def block_sparse_flops_per_token(args, seq_len: int) -> float:
    keys = block_sparse_keys_per_query(seq_len, args.block_sparse_block, args.block_sparse_local,
                                       args.block_sparse_global)
    return softmax_attention_flops(args, keys)


@register_mixer("block_sparse", family="attention", flops_per_token=block_sparse_flops_per_token)
def build_block_sparse(args: FusionModelArgs) -> BlockSparseAttention:
    return BlockSparseAttention(args)

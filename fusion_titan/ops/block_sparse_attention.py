"""Block-sparse causal attention: local blocks plus global tokens (the `block_sparse` mixer).

The sequence is cut into blocks of `block` tokens. A query at position i (block i // block) may
attend key j iff j <= i and

    i // block - j // block < local      (its own block and the local - 1 previous ones), or
    j < n_global                         (the first n_global tokens of the row: global tokens)

and, with `document_ids` [B, k_len], the two are in the same document (the global tokens are then
those of the row, which other documents cannot see). This is the sliding-block + global pattern
of Longformer / BigBird without the random blocks. Layout and conventions as in
fusion_titan/ops/attention.py: [B, H, T, D], GQA by kv head h // (H / H_kv), and the q_len
queries are the LAST q_len of the k_len positions (decode).

Backends: "flex" (FlexAttention with a BlockMask, which skips the fully masked tiles: the fast
path on CUDA), "sdpa" (the dense boolean mask through torch SDPA), "reference" (the dense mask,
plain softmax in float32/float64). "auto" = flex on CUDA, sdpa elsewhere. On CPU with autograd
flex falls back to sdpa (FlexAttention has no CPU backward). "flash" cannot express the mask.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .attention import BACKENDS, _check_document_ids, _compiled_flex_attention, _repeat_kv, _warn_once


def block_sparse_mask(
    q_len: int, k_len: int, block: int, local: int, n_global: int, device,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense boolean mask broadcastable to [B, H, q_len, k_len] (True = may attend)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    near = (q_pos // block - k_pos // block) < local
    mask = ((k_pos <= q_pos) & (near | (k_pos < n_global)))[None, None]
    if document_ids is not None:
        _check_document_ids(document_ids, k_len)
        q_doc = document_ids[:, k_len - q_len:]
        mask = mask & (q_doc[:, None, :, None] == document_ids[:, None, None, :])
    return mask


def _mask_mod(q_len: int, k_len: int, block: int, local: int, n_global: int, document_ids):
    offset = k_len - q_len

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        allowed = (kv_idx <= q_pos) & (((q_pos // block - kv_idx // block) < local) | (kv_idx < n_global))
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_pos] == document_ids[b, kv_idx])
        return allowed

    return mask_mod


def _create_block_mask(q_len, k_len, block, local, n_global, device, document_ids=None):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        _mask_mod(q_len, k_len, block, local, n_global, document_ids),
        B=None if document_ids is None else document_ids.shape[0], H=None,
        Q_LEN=q_len, KV_LEN=k_len, device=device,
    )


@functools.lru_cache(maxsize=32)
def _shape_block_mask(q_len: int, k_len: int, block: int, local: int, n_global: int, device: str):
    return _create_block_mask(q_len, k_len, block, local, n_global, device)


def block_sparse_block_mask(q_len, k_len, block, local, n_global, device, document_ids=None):
    """The FlexAttention BlockMask of this pattern (cached per shape when there are no documents)."""
    if document_ids is not None:
        _check_document_ids(document_ids, k_len)
        return _create_block_mask(q_len, k_len, block, local, n_global, device, document_ids)
    return _shape_block_mask(q_len, k_len, block, local, n_global, str(torch.device(device)))


def _dense(q, k, v, scale, mask, reference: bool):
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if not reference:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(compute)).to(q.dtype)


def _flex(q, k, v, scale, block, local, n_global, document_ids):
    from torch.nn.attention.flex_attention import flex_attention

    q_len, k_len = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if torch.compiler.is_compiling():  # in-graph mask, flex compiled with the model
        block_mask = _create_block_mask(q_len, k_len, block, local, n_global, q.device, document_ids)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    block_mask = block_sparse_block_mask(q_len, k_len, block, local, n_global, q.device, document_ids)
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager (unfused) flex is fine off-GPU: tests and CPU runs
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def block_sparse_attention(
    q, k, v, block: int, local: int, n_global: int, scale: float, backend: str = "auto",
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention over q [B,H,Tq,D], k/v [B,H_kv,Tk,D]; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend {backend!r} is not one of {BACKENDS}")
    if backend == "flash":
        raise NotImplementedError(
            "attn_backend 'flash' cannot express the block_sparse mask; use 'flex' (CUDA) or 'sdpa'"
        )
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa"
    if backend == "flex" and not q.is_cuda and torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v)
    ):
        _warn_once("block_sparse_flex_cpu", "FlexAttention has no backward on CPU; the block_sparse "
                   "mixer uses SDPA with the dense mask for this call")
        backend = "sdpa"
    if backend == "flex":
        return _flex(q, k, v, scale, block, local, n_global, document_ids)
    mask = block_sparse_mask(q.shape[2], k.shape[2], block, local, n_global, q.device, document_ids)
    return _dense(q, k, v, scale, mask, reference=backend == "reference")


def block_sparse_keys_per_query(seq_len: int, block: int, local: int, n_global: int) -> float:
    """Average number of keys a query sees under the mask (no documents), for the FLOPs count."""
    total = 0
    for i in range(seq_len):
        local_start = max(0, (i // block - local + 1) * block)
        total += (i - local_start + 1) + min(n_global, local_start)
    return total / seq_len

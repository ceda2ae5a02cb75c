"""Causal attention with optional sliding window and document mask, behind one call whatever the backend.

Layout is [B, H, T, D]. q/k may have a larger head dim than v (MLA: 192 vs 128), and k/v may have
fewer heads than q (GQA: H_kv divides H; query head h reads kv head h // (H / H_kv), the
`repeat_interleave` convention of SDPA's `enable_gqa`, FlexAttention and flash-attn).

Masking convention (every backend): the q_len queries are the LAST q_len positions of the k_len
keys (so a decode step with a KV cache passes q_len < k_len). Query at position i may attend key j
iff j <= i, and, with a sliding window W > 0, j > i - W (W keys including itself), and, with
`document_ids` [B, k_len], document_ids[b, i] == document_ids[b, j].

Backends (`backend=`):
  "sdpa"      torch SDPA. is_causal when nothing else is masked, else a boolean mask. On CUDA with
              qk head dim != v head dim (the flash kernel rejects that) it prefers cuDNN, then
              memory-efficient attention, via `sdpa_kernel`.
  "flex"      FlexAttention with a causal / sliding-window / document mask_mod. BlockMasks are built
              once per (shape, window, device) and cached; document masks are cached per
              document_ids tensor (one entry), so all layers of one step share one BlockMask.
              Called eagerly: compiled on CUDA, unfused (materializes scores) elsewhere. Inside a
              compiled model the mask is built in-graph and flex is compiled with the model.
              Flex has no CPU backward: on CPU with autograd the same mask goes through SDPA
              (warned once).
  "flash"     flash-attn's `flash_attn_func` (CUDA, fp16/bf16), window_size for the sliding window;
              v is zero-padded when its head dim differs. No document masks (needs varlen).
  "reference" plain softmax(QK^T)V in float32 (float64 stays float64): what the others are tested
              against.
  "auto"      "flex" on CUDA when a sliding window or a document mask is in play, else "sdpa".
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash", "reference")


# ----------------------------------------------------------------------------------------------
# masks


def window_mask(q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True where query i may attend key j (queries are the last q_len keys)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= k_pos > q_pos - window
    return allowed


def attention_mask(
    q_len: int, k_len: int, window: int, device, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask broadcastable to [B, H, q_len, k_len]: [1, 1, q, k], or [B, 1, q, k] with documents."""
    mask = window_mask(q_len, k_len, window, device)[None, None]
    if document_ids is not None:
        _check_document_ids(document_ids, k_len)
        q_doc = document_ids[:, k_len - q_len:]
        mask = mask & (q_doc[:, None, :, None] == document_ids[:, None, None, :])
    return mask


def _check_document_ids(document_ids: torch.Tensor, k_len: int) -> None:
    if document_ids.dim() != 2 or document_ids.shape[1] != k_len:
        raise ValueError(
            f"document_ids must be [B, k_len={k_len}] (one id per key position), got "
            f"{tuple(document_ids.shape)}"
        )


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, n_heads, T, D], query head h reading kv head h // (n_heads / H_kv)."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot be grouped over {n_kv} key/value heads")
    return x.repeat_interleave(n_heads // n_kv, dim=1)


# ----------------------------------------------------------------------------------------------
# reference


def reference_attention(
    q, k, v, scale: float, window: int = 0, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain softmax(QK^T)V in float32 (or float64): the obviously-correct path every backend is tested against."""
    compute = torch.promote_types(q.dtype, torch.float32)
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) * scale
    mask = attention_mask(q.shape[2], k.shape[2], window, q.device, document_ids)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.to(compute)).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# sdpa


def _sdpa_backends(q: torch.Tensor, v: torch.Tensor):
    """Kernel priority for SDPA, or None to let PyTorch choose.

    The flash kernel needs qk head dim == v head dim; cuDNN (Hopper) takes 192/128, and
    memory-efficient attention is the fallback (math last, so something always runs).
    """
    if not q.is_cuda or q.shape[-1] == v.shape[-1]:
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_attention(
    q, k, v, scale: float, window: int = 0, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    q_len, k_len = q.shape[2], k.shape[2]
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    full = window <= 0 or window >= k_len
    kwargs: dict = {"scale": scale}
    if full and document_ids is None and q_len == k_len:
        kwargs["is_causal"] = True
    elif full and document_ids is None and q_len == 1:
        pass  # one decode step sees every cached key
    else:
        kwargs["attn_mask"] = attention_mask(q_len, k_len, window, q.device, document_ids)
    backends = _sdpa_backends(q, v)
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------------------------
# flex


def _flex_mask_mod(q_len: int, k_len: int, window: int, document_ids: torch.Tensor | None):
    offset = k_len - q_len  # queries are the last q_len positions

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        allowed = kv_idx <= q_pos
        if window > 0:
            allowed = allowed & (kv_idx > q_pos - window)
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_pos] == document_ids[b, kv_idx])
        return allowed

    return mask_mod


@functools.lru_cache(maxsize=64)
def _flex_shape_block_mask(q_len: int, k_len: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    mod = _flex_mask_mod(q_len, k_len, window, None)
    return create_block_mask(mod, B=None, H=None, Q_LEN=q_len, KV_LEN=k_len, device=device)


# One entry: (weakref to the document_ids tensor, its _version, q_len, k_len, window) -> BlockMask.
# A dead weakref or a changed version never hits, so a freed tensor's address cannot be mistaken
# for a new batch's.
_doc_mask_cache: dict = {}


def _flex_document_block_mask(document_ids: torch.Tensor, q_len: int, k_len: int, window: int):
    from torch.nn.attention.flex_attention import create_block_mask

    _check_document_ids(document_ids, k_len)
    key = (document_ids._version, q_len, k_len, window)
    hit = _doc_mask_cache.get("entry")
    if hit is not None and hit[0]() is document_ids and hit[1] == key:
        return hit[2]
    mod = _flex_mask_mod(q_len, k_len, window, document_ids)
    block_mask = create_block_mask(
        mod, B=document_ids.shape[0], H=None, Q_LEN=q_len, KV_LEN=k_len, device=document_ids.device
    )
    _doc_mask_cache["entry"] = (weakref.ref(document_ids), key, block_mask)
    return block_mask


def flex_block_mask(q_len: int, k_len: int, window: int, device, document_ids=None):
    """The (cached) BlockMask of this masking pattern; exposed so callers can inspect or prebuild it."""
    if document_ids is not None:
        return _flex_document_block_mask(document_ids, q_len, k_len, window)
    return _flex_shape_block_mask(q_len, k_len, max(window, 0), str(torch.device(device)))


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_fn(
    q, k, v, scale: float, window: int = 0, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    q_len, k_len = q.shape[2], k.shape[2]
    if window >= k_len:
        window = 0
    gqa = k.shape[1] != q.shape[1]
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # FlexAttention has no CPU backward: same mask through SDPA instead (CPU smoke runs only).
        _warn_once("flex_cpu_backward", "FlexAttention has no backward on CPU; using SDPA with "
                   "the same mask for this call")
        return sdpa_attention(q, k, v, scale, window, document_ids)
    if torch.compiler.is_compiling():
        # Inside a compiled model: dynamo traces the mask construction into the graph (no Python
        # cache, no graph break) and compiles flex_attention itself.
        from torch.nn.attention.flex_attention import create_block_mask

        if document_ids is not None:
            _check_document_ids(document_ids, k_len)
        if not q.is_cuda:
            # torch 2.13's CPU inductor flex miscomputes strided (transposed) in-graph inputs.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        block_mask = create_block_mask(
            _flex_mask_mod(q_len, k_len, window, document_ids),
            B=None if document_ids is None else document_ids.shape[0], H=None,
            Q_LEN=q_len, KV_LEN=k_len, device=q.device,
        )
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    block_mask = flex_block_mask(q_len, k_len, window, q.device, document_ids)
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager (unfused) flex is fine off-GPU: tests and CPU runs
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------
# flash-attn


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attention_fn(
    q, k, v, scale: float, window: int = 0, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise RuntimeError(
            "attn_backend 'flash' needs the flash-attn package (pip install flash-attn, or the "
            "project's [flash] extra); use 'sdpa' or 'flex' otherwise."
        ) from e
    if document_ids is not None:
        raise NotImplementedError(
            "attn_backend 'flash' does not take document masks (that needs flash_attn_varlen_func); "
            "use 'flex' for intra-document masking."
        )
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:  # flash-attn wants one head dim: pad v, slice the output back
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    window_size = (window - 1, 0) if 0 < window < k.shape[2] else (-1, -1)
    # flash-attn's layout is [B, T, H, D]; causal aligns queries to the end of the keys, like ours.
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=scale, causal=True, window_size=window_size,
    )
    return out[..., :v_dim].transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# dispatch


def resolve_backend(backend: str, q: torch.Tensor, window: int = 0, document_ids=None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        masked = window > 0 or document_ids is not None
        return "flex" if (q.is_cuda and masked) else "sdpa"
    return backend


_IMPLS = {
    "sdpa": sdpa_attention,
    "flex": flex_attention_fn,
    "flash": flash_attention_fn,
    "reference": reference_attention,
}


def causal_attention(
    q, k, v, scale: float | None = None, window: int = 0, backend: str = "sdpa",
    document_ids: torch.Tensor | None = None,
):
    """Causal (optionally sliding-window, optionally per-document) attention; see the module docstring."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    impl = _IMPLS[resolve_backend(backend, q, window, document_ids)]
    return impl(q, k, v, scale, window, document_ids)

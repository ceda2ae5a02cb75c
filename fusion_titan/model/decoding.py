"""Prefill + decode for the whole hybrid (DeepSeek-style incremental inference).

A `ModelCache` holds one mixer cache per trunk block, made by the block's mixer (`new_cache`):

  kind "mla"  -> MLACache    the compressed latent c_kv + rotated rope key per kept token; grows by
                             (kv_lora_rank + qk_rope_head_dim) elements per token (per batch row)
                             until a sliding window (if any) caps it at `sliding_window` tokens
  kind "gdn"  -> GDNCache    conv states + delta-rule state: constant size (after the first chunk)
  kind "mamba2" -> Mamba2Cache conv state + SSD state: constant size
  other kinds: see each mixer in fusion_titan/model/mixers

plus `position`, the number of tokens consumed so far (= absolute position of the next token),
and, when the model has Engram layers, `token_history`: the last engram_ngram - 1 token ids per
sequence (the n-grams of the next tokens reach back into them; model/engram.py).
Hyper-connection streams (residual = "hyper") are per-token and need no cache.
The feed-forwards (dense SwiGLU and DeepSeekMoE) are per-token and need no cache; MoE routing is
token-local in eval mode (capacity dropping and load counting happen in training forwards only),
so run decoding with `model.eval()`. The MTP modules are training-only and are not used here.

Usage:

    cache = new_model_cache(model, batch_size)
    logits = model(prompt, cache=cache)          # prefill: [B, P, V], cache.position == P
    logits = model(next_tokens, cache=cache)     # decode:  [B, T_new, V] for the new tokens

`model(tokens, cache=...)` updates the cache in place. A cache belongs to one batch of sequences
of equal length (no padding / ragged batches) and is not safe to reuse after an exception mid-way
through a forward (some layers may have been advanced, others not).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch


if TYPE_CHECKING:  # model.py imports this module
    from .model import FusionModel

LayerCache = Any  # whatever the layer's mixer.new_cache() returns (a dataclass of tensors)


@dataclass
class ModelCache:
    """Decoding state of a FusionModel's trunk.

    layers         one cache per trunk block, in `model.layers` order
    batch_size     the batch the cache was made for
    position       tokens consumed so far = absolute position of the next token
    history_len    token ids to keep (engram_ngram - 1 with Engram layers, else 0)
    token_history  [B, <= history_len] the last ids consumed (None before the first chunk)
    """

    layers: list[LayerCache] = field(default_factory=list)
    batch_size: int = 1
    position: int = 0
    history_len: int = 0
    token_history: torch.Tensor | None = None

    def advance(self, tokens: torch.Tensor) -> None:
        """Account for the chunk `tokens` [B, T] just consumed."""
        self.position += tokens.shape[1]
        if self.history_len:
            seen = tokens if self.token_history is None else torch.cat([self.token_history, tokens], 1)
            self.token_history = seen[:, -self.history_len:]


def new_layer_cache(block, batch_size: int, dtype: torch.dtype | None = None, device=None) -> LayerCache:
    """An empty cache for one FusionBlock (its mixer makes it)."""
    return block.mixer.new_cache(batch_size, dtype=dtype, device=device)


def new_model_cache(
    model: "FusionModel", batch_size: int, dtype: torch.dtype | None = None, device=None
) -> ModelCache:
    """An empty (position 0) cache for `model`'s trunk. The MLA latents are stored in `dtype`
    (default: the parameters' dtype) on `device` (default: the parameters' device); the recurrent
    caches are created lazily by the first forward in the activations' dtype (their states in
    float32, or float64 for a float64 model)."""
    layers = [new_layer_cache(b, batch_size, dtype, device) for b in model.layers.values()]
    args = model.model_args
    history = args.engram_ngram - 1 if args.engram_layers else 0
    return ModelCache(layers=layers, batch_size=batch_size, position=0, history_len=history)


def _tensor_bytes(obj) -> int:
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def cache_nbytes(cache: ModelCache | LayerCache) -> int:
    """Bytes of tensor data held by a ModelCache (all layers) or by one layer's cache.

    Logical sizes (numel * element_size) of the tensors the cache references: a conv state that
    is a view of a larger prefill buffer counts as its own size only.
    """
    if isinstance(cache, ModelCache):
        return sum(_tensor_bytes(layer) for layer in cache.layers) + _tensor_bytes(cache.token_history)
    return _tensor_bytes(cache)


def layer_nbytes(cache: ModelCache) -> list[int]:
    """cache_nbytes of each layer's cache, in layer order (for per-layer reports)."""
    return [_tensor_bytes(layer) for layer in cache.layers]


@torch.no_grad()
def greedy_generate(model: "FusionModel", prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy (argmax) continuation of `prompt` by `n_new` tokens with prefill + cached decoding.

    prompt [B, P] (or [P]) token ids, P >= 1. Returns [B, P + n_new] (or [P + n_new]): the prompt
    followed by the generated tokens. Runs in eval mode (restoring the model's mode afterwards)
    and without autograd. Equivalent to re-running the full forward on the growing sequence and
    appending the argmax of the last position each step, at O(1) trunk work per new token for the
    recurrent layers and O(context) for the MLA layers.
    """
    squeeze = prompt.dim() == 1
    if squeeze:
        prompt = prompt.unsqueeze(0)
    if prompt.shape[1] < 1:
        raise ValueError("greedy_generate needs a non-empty prompt")
    out = [prompt]
    was_training = model.training
    model.eval()
    try:
        if n_new > 0:
            cache = new_model_cache(model, prompt.shape[0])
            logits = model(prompt, cache=cache)
            for i in range(n_new):
                nxt = logits[:, -1].argmax(dim=-1, keepdim=True).to(prompt.dtype)
                out.append(nxt)
                if i + 1 < n_new:
                    logits = model(nxt, cache=cache)
    finally:
        model.train(was_training)
    tokens = torch.cat(out, dim=1)
    return tokens[0] if squeeze else tokens

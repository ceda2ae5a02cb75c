"""The fusion hybrid: tied embedding -> blocks of the layer pattern -> norm -> tied head (+ MTP).

With `residual = "hyper"` the embedding is copied into `hyper_streams` streams that the blocks
carry, summed back before the final norm (model/hyper_connections.py). With `engram_layers`,
an Engram memory (model/engram.py) adds its gated n-gram lookup to the stream before each of
those blocks.

With `labels` the forward returns the loss *sums* it needs (the head is fused with softcap and
cross entropy so full-vocabulary logits never exist); without labels it returns logits.
torchtitan's trainer passes every non-"input" key of the batch dict as a keyword argument, which
is how `labels` arrive here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from torchtitan.protocols.model import ModelProtocol

from ..ops.softcap_cross_entropy import (
    IGNORE_INDEX,
    head_kernel_dtype,
    library_linear_cross_entropy,
    linear_softcap_cross_entropy,
    resolve_ce_impl,
    softcap_logits,
)
from .args import FusionModelArgs
from .blocks import FusionBlock, init_stds
from .decoding import ModelCache
from .engram import Engram
from .hyper_connections import collapse_streams, expand_streams
from .moe import DeepSeekMoE
from .mtp import MTPModule
from .mup import rescale_init_
from .param_init import init_whole_then_keep_shards, needs_whole_init
from .residual import MULTI_STREAM
from .rope import rope_cache


class FusionModel(ModelProtocol):
    def __init__(self, args: FusionModelArgs):
        super().__init__(args)
        args.validate()
        self.model_args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): FusionBlock(spec, args, layer_index=i) for i, spec in enumerate(args.layer_specs())}
        )
        # keyed by the index of the block they precede
        self.engrams = nn.ModuleDict({str(i): Engram(args, i) for i in sorted(args.engram_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mtp = nn.ModuleList(MTPModule(args) for _ in range(args.mtp_depth))
        # muP (mup's MuSharedReadout): the tied head's logits times 1/width_mult.
        self.logit_scale = 1.0 / args.width_mult
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self, device=None) -> torch.Tensor:
        a = self.model_args
        return rope_cache(a.qk_rope_head_dim, a.max_seq_len, a.rope_theta, device=device)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight  # tied head

    def trunk(self, tokens: torch.Tensor, cache: ModelCache | None = None,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding + blocks -> hidden [B, T, dim] (before the final norm).

        With a cache (fusion_titan.model.decoding), tokens are the next T tokens after
        cache.position: every block runs incrementally on its own layer cache, and the position
        advances by T.
        """
        h = self.tok_embeddings(tokens)
        multi_stream = self.model_args.residual in MULTI_STREAM
        if multi_stream:
            h = expand_streams(h, self.model_args.residual_streams)
        if cache is not None:
            if document_ids is not None:
                raise ValueError("document_ids cannot be combined with a decoding cache")
            self._check_cache(tokens, cache)
        for name, layer in self.layers.items():
            if name in self.engrams:
                previous = None if cache is None else cache.token_history
                h = self.engrams[name](h, tokens, previous, document_ids)
            if cache is None:
                h = layer(h, self.rope, document_ids=document_ids)
            else:
                h = layer(h, self.rope, cache=cache.layers[int(name)])
        if cache is not None:
            cache.advance(tokens)
        return collapse_streams(h) if multi_stream else h

    def _check_cache(self, tokens: torch.Tensor, cache: ModelCache) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"decoding takes tokens [B, T], got shape {tuple(tokens.shape)}")
        if len(cache.layers) != len(self.layers):
            raise ValueError(
                f"cache has {len(cache.layers)} layer caches, the model {len(self.layers)} layers"
            )
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"batch {tokens.shape[0]} does not match the cache's {cache.batch_size}")
        for layer_cache in cache.layers:
            length = getattr(layer_cache, "length", None)  # MLACache tracks its own position
            if length is not None and length != cache.position:
                raise ValueError(
                    f"MLA cache length {length} disagrees with cache.position {cache.position}"
                )

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        return softcap_logits(normed_hidden, self.output_weight, self.model_args.logit_softcap,
                              self.logit_scale)

    def _ce(self, normed_hidden: torch.Tensor, labels: torch.Tensor, want_hits: bool = False):
        """(CE sum, z-loss sum or None, top-1 hits or None) through the configured head kernel.

        Library kernels (ce_impl cce / liger on CUDA) give no hit count, so accuracy is then
        simply not reported; the z-loss needs the chunked op (resolve_ce_impl enforces it).
        """
        h, y = normed_hidden.flatten(0, 1), labels.flatten()
        args = self.model_args
        impl = resolve_ce_impl(args.ce_impl, h.is_cuda, need_extras=args.z_loss,
                               low_precision=head_kernel_dtype(h) in (torch.bfloat16, torch.float16))
        if impl != "chunked":
            return library_linear_cross_entropy(impl, h, self.output_weight, y, args.logit_softcap,
                                                self.logit_scale, args.cce_filter_eps), None, None
        out = linear_softcap_cross_entropy(
            h, self.output_weight, y, softcap=args.logit_softcap, scale=self.logit_scale,
            chunk_size=args.ce_chunk_size, return_hits=want_hits, return_z_loss=args.z_loss,
        )
        out = out if isinstance(out, tuple) else (out,)
        ce = out[0]
        z = out[1] if args.z_loss else None
        hits = out[-1] if want_hits else None
        return ce, z, hits

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: ModelCache | None = None, document_ids: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, V] (no labels), or the loss sums dict (labels [B, T]).

        document_ids [B, T] ([data] document_ids = true): intra-document masking of packed rows —
        every block treats each document as its own sequence (RoPE is relative, so positions
        need no reset); the targets are unchanged.

        cache (decoding, labels must be None): tokens are the next T tokens after cache.position;
        returns the logits of those T tokens and updates the cache in place (the MTP modules are
        not used). Build one with fusion_titan.model.decoding.new_model_cache.
        """
        if cache is not None:
            if labels is not None:
                raise ValueError("labels cannot be combined with a decoding cache")
            return self.logits(self.norm(self.trunk(tokens, cache)))
        h = self.trunk(tokens, document_ids=document_ids)
        if labels is None:
            return self.logits(self.norm(h))
        ce_sum, z_sum, _ = self._ce(self.norm(h), labels)
        out = {"ce_sum": ce_sum}
        if z_sum is not None:
            out["z_sum"] = z_sum
        if self.model_args.moe_has_aux_loss and self.training:
            # the MoE layers keep their weighted auxiliary losses (means over tokens); the trainer
            # divides sums by the global token count, so scale by this rank's tokens
            aux = sum(m.aux_loss for m in self.modules() if isinstance(m, DeepSeekMoE))
            out["moe_aux_sum"] = aux * (labels != IGNORE_INDEX).sum()
        if len(self.mtp):
            out.update(self._mtp_losses(h, tokens, labels, document_ids))
        return out

    def _mtp_losses(self, h: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                    document_ids: torch.Tensor | None = None):
        """Depth k: position t (t < T-k) sees token t+k and predicts labels[t+k] (= token t+k+1)."""
        sums, correct, counts = [], [], []
        seq_len = tokens.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if k >= seq_len:
                break
            docs = None if document_ids is None else document_ids[:, : seq_len - k]
            h, normed = module(h[:, : seq_len - k], self.tok_embeddings(tokens[:, k:]), self.rope, docs)
            target = labels[:, k:]
            loss_sum, _, hits = self._ce(normed, target, want_hits=True)
            sums.append(loss_sum)
            correct.append(hits)
            counts.append((target != IGNORE_INDEX).sum())
        out = {"mtp_sums": torch.stack(sums), "mtp_tokens": torch.stack(counts)}
        if all(c is not None for c in correct):
            out["mtp_correct"] = torch.stack(correct)
        return out

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        if needs_whole_init(self):  # sharded on CPU ranks: draw the weights whole (param_init.py)
            init_whole_then_keep_shards(self, lambda: FusionModel(self.model_args),
                                        lambda m: m._init_weights(buffer_device))
            return
        self._init_weights(buffer_device)

    def _init_weights(self, buffer_device: torch.device | None) -> None:
        args = self.model_args
        nn.init.normal_(self.tok_embeddings.weight, std=args.init_std)
        for layer in self.layers.values():
            layer.init_weights(args, buffer_device)
        std, out_std = init_stds(args)
        for engram in self.engrams.values():
            engram.init_weights(std, out_std)
        self.norm.reset_parameters()
        for module in self.mtp:
            module.init_weights(args, buffer_device)
        rescale_init_(self, args)  # muP: each matrix by its own fan-in multiplier
        device = buffer_device or self.tok_embeddings.weight.device
        self.rope = self._rope_table(device=device)

"""Output head + logit softcap + cross entropy, without materializing [N, vocab] fp32 logits.

logits = cap * tanh(scale * h W^T / cap)   (no tanh when cap = 0)
The forward walks over token chunks, keeping only each token's log-sum-exp; the backward
recomputes one chunk of logits at a time. Peak extra memory is one [chunk, vocab] block instead of
the whole [N, vocab] fp32 logits (about 4.7 GB for 8K tokens at vocab 152064).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def softcap_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float, scale: float = 1.0):
    """Full logits (for evaluation and generation), in float32."""
    z = (h @ weight.t()).float() * scale
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def _capped_logits_(h: torch.Tensor, weight: torch.Tensor, softcap: float, scale: float):
    """One chunk of capped fp32 logits, computed in place (CPU page-faults every fresh buffer)."""
    z = (h @ weight.t()).float()
    if softcap > 0:
        return z.mul_(scale / softcap).tanh_().mul_(softcap)
    return z.mul_(scale) if scale != 1.0 else z


class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    """Returns (summed CE, number of top-1 hits); the hit count is a free by-product for the logs."""

    @staticmethod
    def forward(ctx, h, weight, labels, softcap, scale, chunk_size):
        n_tokens = h.shape[0]
        lse = torch.empty(n_tokens, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        hits = torch.zeros((), dtype=torch.int64, device=h.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            y = labels[start:end]
            valid = y != IGNORE_INDEX
            z = _capped_logits_(h[start:end], weight, softcap, scale)
            target = z.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
            top, top_index = z.max(dim=-1)
            hits += ((top_index == y) & valid).sum()
            # log-sum-exp without a second [chunk, vocab] buffer: z becomes exp(z - max) in place
            chunk_lse = z.sub_(top.unsqueeze(1)).exp_().sum(-1).log_().add_(top)
            lse[start:end] = chunk_lse
            total += torch.where(valid, chunk_lse - target, 0.0).sum()
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.softcap, ctx.scale, ctx.chunk_size = softcap, scale, chunk_size
        ctx.mark_non_differentiable(hits)
        return total, hits

    @staticmethod
    def backward(ctx, grad_total, grad_hits):
        h, weight, labels, lse = ctx.saved_tensors
        softcap, scale, chunk_size = ctx.softcap, ctx.scale, ctx.chunk_size
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            hc, y = h[start:end], labels[start:end]
            valid = y != IGNORE_INDEX
            t = (hc @ weight.t()).float()
            if softcap > 0:
                t.mul_(scale / softcap).tanh_()
                dz = torch.mul(t, softcap)
            else:
                dz = t.mul_(scale)
            # d(lse - z_y)/dz = softmax(z) - onehot(y); ignored tokens contribute nothing
            dz.sub_(lse[start:end, None]).exp_()
            dz.scatter_add_(1, y.clamp_min(0).unsqueeze(1), -valid.to(dz.dtype).unsqueeze(1))
            if not bool(valid.all()):
                dz.mul_(valid.unsqueeze(1))
            if softcap > 0:
                dz.mul_(t.mul_(t).neg_().add_(1.0))  # d(cap * tanh(r / cap))/dr = 1 - tanh^2
            dz.mul_(scale * grad_total)
            if grad_h is not None:
                grad_h[start:end] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            grad_w.addmm_(dz.t(), hc.float())
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def linear_softcap_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float = 0.0,
    scale: float = 1.0, chunk_size: int = 4096, return_hits: bool = False,
):
    """Summed CE over tokens whose label is not IGNORE_INDEX. h [N, D], weight [V, D], labels [N].

    With return_hits, also the number of valid tokens whose top-1 prediction is the label.
    """
    total, hits = _LinearSoftcapCrossEntropy.apply(
        h, weight, labels, float(softcap), float(scale), int(chunk_size)
    )
    return (total, hits) if return_hits else total


def reference_softcap_cross_entropy(h, weight, labels, softcap: float = 0.0, scale: float = 1.0):
    """The unfused path: full fp32 logits, then torch's cross entropy (sum)."""
    z = softcap_logits(h, weight, softcap, scale)
    return torch.nn.functional.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="sum")

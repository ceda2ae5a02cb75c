"""Output head + logit softcap + cross entropy, without materializing [N, vocab] fp32 logits.

logits = cap * tanh(scale * h W^T / cap)   (no tanh when cap = 0)
The forward walks over token chunks, keeping only each token's log-sum-exp; the backward
recomputes one chunk of logits at a time. Peak extra memory is one [chunk, vocab] block instead of
the whole [N, vocab] fp32 logits (about 4.7 GB for 8K tokens at vocab 152064).
"""

from __future__ import annotations

import torch

from .precision import compute_dtype

IGNORE_INDEX = -100


def softcap_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float, scale: float = 1.0):
    """Full logits (for evaluation and generation), in float32."""
    z = (h @ weight.t()).to(compute_dtype(h.dtype)) * scale
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def _capped_logits_(h: torch.Tensor, weight: torch.Tensor, softcap: float, scale: float):
    """One chunk of capped fp32 logits, computed in place (CPU page-faults every fresh buffer)."""
    # matmul in the activations' dtype (bf16 under AMP/FSDP), accumulate the rest in fp32
    z = (h @ weight.to(h.dtype).t()).to(compute_dtype(h.dtype))
    if softcap > 0:
        return z.mul_(scale / softcap).tanh_().mul_(softcap)
    return z.mul_(scale) if scale != 1.0 else z


class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    """Returns (summed CE, summed z-loss lse^2, number of top-1 hits).

    The z-loss (PaLM) and the hit count are by-products of the log-sum-exp already computed.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, labels, softcap, scale, chunk_size):
        n_tokens = h.shape[0]
        acc = compute_dtype(h.dtype)
        lse = torch.empty(n_tokens, dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        z_total = torch.zeros((), dtype=acc, device=h.device)
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
            z_total += torch.where(valid, chunk_lse * chunk_lse, 0.0).sum()
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.softcap, ctx.scale, ctx.chunk_size = softcap, scale, chunk_size
        ctx.mark_non_differentiable(hits)
        return total, z_total, hits

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # backward runs under the forward's autocast state
    def backward(ctx, grad_total, grad_z_total, grad_hits):
        h, weight, labels, lse = ctx.saved_tensors
        softcap, scale, chunk_size = ctx.softcap, ctx.scale, ctx.chunk_size
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # autocast is off in backward: cast explicitly to the dtype the forward multiplied in
        w = weight.to(h.dtype)
        acc = compute_dtype(h.dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            hc, y = h[start:end], labels[start:end]
            valid = y != IGNORE_INDEX
            t = (hc @ w.t()).to(acc)
            if softcap > 0:
                t.mul_(scale / softcap).tanh_()
                dz = torch.mul(t, softcap)
            else:
                dz = t.mul_(scale)
            # d(lse - z_y)/dz = softmax(z) - onehot(y); d(lse^2)/dz = 2 lse softmax(z);
            # ignored tokens contribute nothing
            chunk_lse = lse[start:end, None]
            dz.sub_(chunk_lse).exp_()
            if grad_z_total is not None:
                dz.mul_(grad_total + 2.0 * grad_z_total * chunk_lse)
            else:
                dz.mul_(grad_total)
            dz.scatter_add_(1, y.clamp_min(0).unsqueeze(1),
                            -(valid.to(dz.dtype) * grad_total).unsqueeze(1))
            if not bool(valid.all()):
                dz.mul_(valid.unsqueeze(1))
            if softcap > 0:
                dz.mul_(t.mul_(t).neg_().add_(1.0))  # d(cap * tanh(r / cap))/dr = 1 - tanh^2
            dz.mul_(scale)
            if grad_h is not None:
                grad_h[start:end] = dz.to(h.dtype) @ w
            grad_w.addmm_(dz.t(), hc.to(acc))
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def linear_softcap_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float = 0.0,
    scale: float = 1.0, chunk_size: int = 4096, return_hits: bool = False,
    return_z_loss: bool = False,
):
    """Summed CE over tokens whose label is not IGNORE_INDEX. h [N, D], weight [V, D], labels [N].

    With return_z_loss, also the summed z-loss (lse^2, differentiable); with return_hits, also the
    number of valid tokens whose top-1 prediction is the label. Order: (ce, [z], [hits]).
    """
    total, z_total, hits = _LinearSoftcapCrossEntropy.apply(
        h, weight, labels, float(softcap), float(scale), int(chunk_size)
    )
    out = (total,) + ((z_total,) if return_z_loss else ()) + ((hits,) if return_hits else ())
    return out if len(out) > 1 else total


def reference_softcap_cross_entropy(h, weight, labels, softcap: float = 0.0, scale: float = 1.0):
    """The unfused path: full fp32 logits, then torch's cross entropy (sum)."""
    z = softcap_logits(h, weight, softcap, scale)
    return torch.nn.functional.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------------------------------------
# Fused GPU kernels from libraries (optional extra "kernels"); see scripts/bench_loss.py for why.

CE_IMPLS = ("auto", "chunked", "cce", "liger")


def _library_available(name: str) -> bool:
    try:
        if name == "cce":
            import cut_cross_entropy  # noqa: F401
        else:
            import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def resolve_ce_impl(impl: str, on_cuda: bool, need_extras: bool, *, low_precision: bool) -> str:
    """auto: cut-cross-entropy, else Liger-Kernel, on CUDA when installed; our chunked op otherwise.

    The library kernels give neither the z-loss nor the top-1 hit count, so runs that need them
    (z-loss on, or MTP accuracy) with impl = auto fall back to the chunked op for those calls.
    low_precision: the head's operands reach the kernel in bf16/fp16 (cut-cross-entropy's
    backward accepts nothing else, so float32 runs take Liger or the chunked op).
    """
    if impl not in CE_IMPLS:
        raise ValueError(f"[loss] ce_impl = {impl!r}: choose one of {CE_IMPLS}")
    if impl == "auto":
        if on_cuda and not need_extras:
            for name in ("cce", "liger") if low_precision else ("liger",):
                if _library_available(name):
                    return name
        return "chunked"
    if impl != "chunked":
        if not on_cuda:
            raise ValueError(f"[loss] ce_impl = {impl!r} needs CUDA tensors; use 'chunked' or 'auto'")
        if need_extras:
            raise ValueError(f"[loss] ce_impl = {impl!r} gives no z-loss / hit count; use 'chunked' or 'auto'")
        if impl == "cce" and not low_precision:
            raise ValueError("[loss] ce_impl = 'cce': cut-cross-entropy's backward needs bf16/fp16 "
                             "operands and this run computes in float32; use 'auto' or 'chunked', or "
                             "train in bf16 ([training] mixed_precision_param = \"bfloat16\")")
        if not _library_available(impl):
            package = "cut-cross-entropy" if impl == "cce" else "liger-kernel"
            raise ImportError(f"[loss] ce_impl = {impl!r} needs `pip install {package}` (or use 'auto')")
    return impl


def cce_filter_eps(value: str) -> float | str | None:
    """[loss] cce_filter_eps -> cut-cross-entropy's `filter_eps`.

    The backward skips vocabulary blocks whose softmax gradient is below eps everywhere (the
    library's speed trick). "auto": the library's default (bf16 eps / 32 = 2.4e-4); "off": exact
    gradient (every block computed); a number: that threshold (larger = faster, less exact).
    """
    if value == "auto":
        return "high"
    if value == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"[loss] cce_filter_eps = {value!r}: use 'auto', 'off' or a number such as '1e-3'") from None


def head_kernel_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype a library kernel computes the head in: autocast's on CUDA, else the activations'."""
    if h.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return h.dtype


def library_linear_cross_entropy(impl: str, h, weight, labels, softcap: float, scale: float,
                                 filter_eps: str = "auto"):
    """Summed CE through a library kernel; the muP logit scale is folded into h (h*s) W^T."""
    if scale != 1.0:
        h = h * scale
    dtype = head_kernel_dtype(h)  # the kernels want both operands in one dtype
    h, weight = h.to(dtype), weight.to(dtype)
    cap = softcap if softcap > 0 else None
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(h, weight, labels, ignore_index=IGNORE_INDEX, softcap=cap,
                                    reduction="sum", filter_eps=cce_filter_eps(filter_eps)).float()
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, weight, labels, ignore_index=IGNORE_INDEX,
                                            reduction="sum", softcap=cap).float()

"""Benchmark the output head + logit softcap + cross entropy (forward + backward) on a GPU.

    python scripts/bench_loss.py [--tokens 16384] [--dim 1024] [--vocab 152064] [--softcap 15]

Compares, in one process on the same bf16 inputs: the unfused reference (full fp32 logits,
softcap, torch cross entropy), our chunked op (fusion_titan/ops/softcap_cross_entropy.py) at two
chunk sizes, and, when installed, Liger-Kernel's fused linear cross entropy and Apple's
cut-cross-entropy (both support softcap). Reports median fwd+bwd time, peak extra memory and the
loss's relative difference to the reference, each also as a ratio to the reference.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from fusion_titan.ops.softcap_cross_entropy import linear_softcap_cross_entropy


def unfused(h, w, y, cap):
    z = (h @ w.t()).float()
    z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z, y, reduction="sum")


def candidates(cap):
    out = {"unfused (fp32 logits)": unfused,
           "ours, chunk 4096": lambda h, w, y, c: linear_softcap_cross_entropy(h, w, y, c, 1.0, 4096),
           "ours, chunk 8192": lambda h, w, y, c: linear_softcap_cross_entropy(h, w, y, c, 1.0, 8192)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=cap)
        out["Liger-Kernel FLCE"] = lambda h, w, y, c: liger(w, h, y)
    except Exception as e:  # not installed
        print(f"# Liger-Kernel unavailable: {e}")
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cut-cross-entropy"] = lambda h, w, y, c: linear_cross_entropy(h, w, y, softcap=c, reduction="sum")
    except Exception as e:
        print(f"# cut-cross-entropy unavailable: {e}")
    return out


def measure(fn, h, w, y, cap, repeats=5):
    times, peak = [], 0
    for i in range(repeats + 2):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(hh, ww, y, cap)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        value = loss.item()
        del loss, hh, ww
    return statistics.median(times), peak, value


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--softcap", type=float, default=15.0)
    a = p.parse_args()
    torch.manual_seed(0)
    h = torch.randn(a.tokens, a.dim, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(a.vocab, a.dim, device="cuda") * 0.02).bfloat16()
    y = torch.randint(0, a.vocab, (a.tokens,), device="cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, N={a.tokens} D={a.dim} "
          f"V={a.vocab} softcap={a.softcap}, bf16 inputs, fwd+bwd")
    rows = {name: measure(fn, h, w, y, a.softcap) for name, fn in candidates(a.softcap).items()}
    ref_t, ref_m, ref_v = rows["unfused (fp32 logits)"]
    print("| implementation | ms | x time vs unfused | peak extra GiB | x memory vs unfused | rel. loss diff |")
    print("|---|---|---|---|---|---|")
    for name, (t, m, v) in rows.items():
        print(f"| {name} | {t:.1f} | {t / ref_t:.2f} | {m / 2**30:.2f} | {m / ref_m:.3f} | "
              f"{abs(v - ref_v) / abs(ref_v):.1e} |")


if __name__ == "__main__":
    main()

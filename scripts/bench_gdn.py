"""Gated delta rule op on one GPU, in one process, at a flavor's GDN shapes (default fusion_1b, B4 T4096).

    python scripts/bench_gdn.py [--flavor fusion_1b] [--batch 4] [--seq 4096] [--compiled] [--reps 20]

Prints, in this order:
1. wall-clock timings (benchmark.gdn_micro: median of --reps synchronized calls, host launch time
   included): fla's forward (and backward where it is safe), ours in PyTorch and in Triton, with
   ratios over fla's forward;
2. GPU kernel time per call (torch.profiler, the sum of the kernels' device time over 3 calls,
   host overhead excluded, so the steadier figure) of ours in Triton (forward, forward+backward)
   and fla (forward; forward+backward where safe), each with its per-kernel table, and the ratios
   against the issue-17 targets: Triton forward <= 1.25x fla's forward, forward+backward <= 3.5x;
3. the autotuned config of each of our kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import gdn_inputs, gdn_micro  # noqa: E402

TARGETS = {"fwd": 1.25, "fwd_bwd": 3.5}  # ours in Triton over fla's forward


def kernel_ms(name: str, fn, calls: int = 3) -> float:
    """GPU time of fn per call (ms): its kernels' device time summed over `calls` calls (after one
    untimed call: autotuning, compilation); prints the per-kernel table."""
    import torch

    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events)  # self_cuda_time_total: gone in torch 2.11
    print(f"--- {name}: {total_us / calls / 1e3:.3f} ms of GPU kernels per call")
    print(events.table(sort_by="self_device_time_total", row_limit=12))
    return total_us / calls / 1e3


def kernel_comparison(flavor: str, batch: int, seq: int) -> dict:
    """Kernel time per call of ours in Triton and of fla, and our ratios over fla's forward."""
    import torch

    from fusion_titan.ops.gated_delta_rule import fla_is_safe
    from fusion_titan.ops.gated_delta_rule_triton import triton_chunk_gated_delta_rule

    _, leaves = gdn_inputs(flavor, batch, seq)

    def fwd(fn):
        def call():
            with torch.no_grad():
                fn(*leaves)
        return call

    def fwd_bwd(fn):
        def call():
            for x in leaves:  # no gradient accumulation kernels in the figure
                x.grad = None
            fn(*leaves)[0].float().square().mean().backward()
        return call

    out = {"ours_triton_fwd_kernel_ms": kernel_ms("ours (Triton) forward", fwd(triton_chunk_gated_delta_rule)),
           "ours_triton_fwd_bwd_kernel_ms": kernel_ms("ours (Triton) forward+backward",
                                                      fwd_bwd(triton_chunk_gated_delta_rule))}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception as e:  # fla not installed
        out["fla"] = f"unavailable: {e}"
        return out
    out["fla_fwd_kernel_ms"] = kernel_ms("fla forward", fwd(fla_chunk))
    safe, why = fla_is_safe()
    if safe:
        out["fla_fwd_bwd_kernel_ms"] = kernel_ms("fla forward+backward", fwd_bwd(fla_chunk))
    else:
        out["fla_backward"] = f"not run: {why}"
    for part, target in TARGETS.items():
        ratio = out[f"ours_triton_{part}_kernel_ms"] / out["fla_fwd_kernel_ms"]
        out[f"ours_triton_{part}_over_fla_fwd_kernel"] = ratio
        out[f"ours_triton_{part}_target_met"] = f"{ratio <= target} (target <= {target}x)"
    return out


def print_figures(title: str, out: dict) -> None:
    print(f"=== {title}")
    width = max(map(len, out))
    for key, value in out.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="fusion_1b", help="takes the GDN head counts and dims from it")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--compiled", action="store_true", help="also time our PyTorch op under torch.compile")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per wall-clock figure (the median is kept)")
    args = ap.parse_args()
    print_figures("wall clock (ms, median of synchronized calls)",
                  gdn_micro(args.flavor, args.batch, args.seq, compiled=args.compiled, reps=args.reps))
    print_figures("GPU kernel time (ms per call, torch.profiler)",
                  kernel_comparison(args.flavor, args.batch, args.seq))
    try:  # the autotuned kernel configs, to pin them down later
        import triton

        from fusion_titan.ops import gated_delta_rule_triton as kernels

        for name, kernel in vars(kernels).items():
            if isinstance(kernel, triton.runtime.autotuner.Autotuner):
                print(f"{name}: {getattr(kernel, 'best_config', None)}")
    except Exception as e:  # reporting only
        print(f"configs unavailable: {e}")


if __name__ == "__main__":
    main()

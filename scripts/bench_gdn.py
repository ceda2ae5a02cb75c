"""Gated delta rule op timings on one GPU, in one process: fla's forward (and backward where it is
safe), ours in PyTorch (forward, forward+backward) and ours in Triton, with ratios over fla's
forward (the targets: Triton forward <= 1.25x, forward+backward <= 3.5x).

    python scripts/bench_gdn.py [--flavor fusion_1b] [--batch 4] [--seq 4096] [--compiled] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import gdn_inputs, gdn_micro  # noqa: E402


def profile_triton(flavor: str, batch: int, seq: int) -> None:
    """GPU time per kernel of our Triton forward+backward (torch.profiler), 3 calls."""
    import torch

    from fusion_titan.ops.gated_delta_rule_triton import triton_chunk_gated_delta_rule

    _, leaves = gdn_inputs(flavor, batch, seq)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            triton_chunk_gated_delta_rule(*leaves)[0].float().square().mean().backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="fusion_1b", help="takes the GDN head counts and dims from it")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--compiled", action="store_true", help="also time our PyTorch op under torch.compile")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per figure (the median is kept)")
    args = ap.parse_args()
    out = gdn_micro(args.flavor, args.batch, args.seq, compiled=args.compiled, reps=args.reps)
    width = max(map(len, out))
    for key, value in out.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    profile_triton(args.flavor, args.batch, args.seq)
    try:  # the autotuned kernel configs, to pin them down later
        from fusion_titan.ops import gated_delta_rule_triton as kernels

        for name in ("_prepare_kernel", "_fwd_state_kernel", "_fwd_output_kernel", "_bwd_local_kernel",
                     "_bwd_state_kernel", "_bwd_grads_kernel"):
            print(f"{name}: {getattr(getattr(kernels, name), 'best_config', None)}")
    except Exception as e:  # reporting only
        print(f"configs unavailable: {e}")


if __name__ == "__main__":
    main()

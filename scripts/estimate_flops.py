"""Training FLOPs per token of each flavor, by kind of work (what MFU divides by).

    python scripts/estimate_flops.py [--seq-len 4096] [--flavor fusion_1b]

Models are built on the meta device; the matmul term counts the parameters a token really
touches (top-k routed experts, shared experts, MLA/GDN projections, MTP modules), and the
attention / recurrent terms follow fusion_titan/model/flops.py (causal half, sliding window,
chunked Gated DeltaNet). The trainer logs MFU with exactly this count.
"""

import argparse

import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.flops import count_params, flops_breakdown
from fusion_titan.model.model import FusionModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--flavor", choices=list(FLAVORS), action="append")
    opts = parser.parse_args()
    for name in opts.flavor or list(FLAVORS):
        args = FLAVORS[name]
        with torch.device("meta"):
            model = FusionModel(args)
        parts = flops_breakdown(args, opts.seq_len, count_params(model, args))
        total = sum(parts.values())
        print(f"{name} @ seq {opts.seq_len}: {total / 1e9:.2f} GFLOP/token (forward + backward)")
        for kind, value in parts.items():
            print(f"  {kind:40s} {value / 1e9:8.3f} GFLOP  {100 * value / total:5.1f}%")


if __name__ == "__main__":
    main()

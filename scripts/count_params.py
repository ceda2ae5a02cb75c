"""Print total / active parameter counts and training FLOPs per token of each flavor.

    python scripts/count_params.py [--seq-len 4096] [--flavor fusion_7b]

Models are built on the meta device, so no memory is used; the numbers come from the modules
themselves (the same code the trainer logs), not from a formula.
"""

import argparse

import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.flops import count_params, flops_per_token
from fusion_titan.model.model import FusionModel


def describe(name: str, seq_len: int) -> dict:
    args = FLAVORS[name]
    with torch.device("meta"):
        model = FusionModel(args)
    c = count_params(model, args)
    return {
        "flavor": name, "total": c.total, "active": c.active, "trunk_total": c.trunk_total,
        "trunk_active": c.trunk_active, "embedding": c.embedding, "routed_experts": c.routed_experts,
        "mtp": c.mtp, "flops_per_token": flops_per_token(args, seq_len, c),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--flavor", choices=list(FLAVORS), action="append")
    opts = parser.parse_args()
    print(f"| flavor | total | active / token | trunk total (no MTP) | trunk active | embedding (tied) "
          f"| routed experts | MTP | train GFLOP/token @ seq {opts.seq_len} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in opts.flavor or list(FLAVORS):
        r = describe(name, opts.seq_len)
        b = lambda n: f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"  # noqa: E731
        print(f"| {name} | {b(r['total'])} | {b(r['active'])} | {b(r['trunk_total'])} | "
              f"{b(r['trunk_active'])} | {b(r['embedding'])} | {b(r['routed_experts'])} | {b(r['mtp'])} | "
              f"{r['flops_per_token'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()

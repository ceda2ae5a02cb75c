"""The DeepSeek router's forward on one GPU, compiled as in training: its top-k by a sort
(`routers.top_k`, what the model runs) against the same router with torch.topk (before).

    python scripts/bench_router.py [--flavor fusion_1b] [--tokens 32768] [--reps 50]

Prints the GPU kernel time per call of each form (benchmark.kernel_ms: the kernels' device time,
host overhead excluded, with its per-kernel table) and their ratio, and the number of tokens for
which the two choose other experts (they may differ on ties).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py (it puts the repo root on the path)

from benchmark import kernel_ms  # noqa: E402
from fusion_titan.model import routers  # noqa: E402
from fusion_titan.model.flavors import FLAVORS  # noqa: E402


def library_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(x, k, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="fusion_1b")
    ap.add_argument("--tokens", type=int, default=32768, help="a micro-batch's tokens (fusion_1b.toml: 8 x 4096)")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    a = FLAVORS[args.flavor]
    torch.manual_seed(0)
    router = routers.GroupLimitedRouter(a.dim, a.n_routed_experts, a.n_activated_experts, a.n_expert_groups,
                                        a.n_limited_groups, a.route_scale).cuda()
    x = torch.randn(args.tokens, a.dim, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(a.n_routed_experts, device="cuda") * 1e-2
    results, original = {}, routers.top_k
    try:
        for name, impl in (("sort", original), ("topk", library_top_k)):
            routers.top_k = impl  # the router looks it up at call time
            torch._dynamo.reset()
            fn = torch.compile(router, fullgraph=True, dynamic=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                results[name] = (kernel_ms(f"router forward, {name}", lambda: fn(x, bias), args.reps), fn(x, bias)[1])
    finally:
        routers.top_k = original
    # the same experts per token, up to the order of ties (bf16 logits tie often)
    differ = (results["sort"][1].sort(-1).values != results["topk"][1].sort(-1).values).any(-1)
    print(f"router forward, {args.flavor}, {args.tokens} tokens, bf16 autocast, compiled (GPU kernel ms per call)")
    for name, (ms, _) in results.items():
        print(f"  {name:5s} {ms:.4f}")
    print(f"sort / topk: {results['sort'][0] / results['topk'][0]:.3f}   tokens with other experts: {int(differ.sum())} of {differ.numel()}")


if __name__ == "__main__":
    main()

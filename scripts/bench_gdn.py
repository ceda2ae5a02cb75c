"""Gated delta rule op on one GPU, in one process, at a flavor's GDN shapes (default fusion_1b, B4 T4096).

    python scripts/bench_gdn.py [--flavor fusion_1b] [--batch 4] [--seq 4096] [--compiled] [--reps 20]
        [--version git:REV | --version PATH ...]

Prints, in this order:
1. wall-clock timings (benchmark.gdn_micro: median of --reps synchronized calls, host launch time
   included): fla's forward (and backward where it is safe), ours in PyTorch and in Triton, with
   ratios over fla's forward;
2. GPU kernel time per call (torch.profiler, the sum of the kernels' device time over 3 calls,
   host overhead excluded, so the steadier figure) of ours in Triton (forward, forward+backward)
   and fla (forward; forward+backward where safe), each with its per-kernel table, and the ratios
   against the issue-17 targets: Triton forward <= 1.25x fla's forward, forward+backward <= 3.5x;
3. the autotuned config of each of our kernels.

`--version` (repeatable) adds other versions of ops/gated_delta_rule_triton.py to the kernel-time
comparison, in the same process: `git:REV` (that commit's file) or a path. Each gets its forward
and forward+backward kernel time and its ratio to the current file's: a change to the kernels is
kept or reverted on one call's figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import gdn_fwd_bwd, gdn_inputs, gdn_micro, kernel_ms  # noqa: E402

TARGETS = {"fwd": 1.25, "fwd_bwd": 3.5}  # ours in Triton over fla's forward
ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILE = "fusion_titan/ops/gated_delta_rule_triton.py"


def load_version(spec: str):
    """Another version of the Triton kernel file as its own module (its custom ops get their own
    namespace from the module name): `git:REV` or a path."""
    if spec.startswith("git:"):
        rev = spec[4:]
        done = subprocess.run(["git", "show", f"{rev}:{KERNEL_FILE}"], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"--version {spec}: `git show {rev}:{KERNEL_FILE}` failed "
                             f"({done.stderr.strip()}); pass the file's path instead")
        path = Path(tempfile.mkdtemp()) / ("gdn_" + re.sub(r"\W", "_", rev) + ".py")
        path.write_text(done.stdout)
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--version {spec}: no such file")
    name = "gdn_version_" + re.sub(r"\W", "_", spec)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def kernel_comparison(flavor: str, batch: int, seq: int, versions: tuple[str, ...] = ()) -> dict:
    """Kernel time per call of ours in Triton and of fla, and our ratios over fla's forward; each
    of `versions` (see load_version) timed too, with its ratio to the current file's."""
    import torch

    from fusion_titan.ops.gated_delta_rule import fla_is_safe
    from fusion_titan.ops.gated_delta_rule_triton import triton_chunk_gated_delta_rule

    _, leaves = gdn_inputs(flavor, batch, seq)

    def fwd(fn):
        def call():
            with torch.no_grad():
                fn(*leaves)
        return call

    do = torch.randn_like(leaves[2])  # o has v's shape and dtype

    def fwd_bwd(fn):
        return gdn_fwd_bwd(fn, leaves, do)

    out = {"ours_triton_fwd_kernel_ms": kernel_ms("ours (Triton) forward", fwd(triton_chunk_gated_delta_rule)),
           "ours_triton_fwd_bwd_kernel_ms": kernel_ms("ours (Triton) forward+backward",
                                                      fwd_bwd(triton_chunk_gated_delta_rule))}
    for spec in versions:
        other = load_version(spec).triton_chunk_gated_delta_rule
        for part, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
            ms = kernel_ms(f"{spec} {label}", (fwd if part == "fwd" else fwd_bwd)(other))
            out[f"{spec}_{part}_kernel_ms"] = ms
            out[f"current_over_{spec}_{part}"] = out[f"ours_triton_{part}_kernel_ms"] / ms
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
    ap.add_argument("--version", action="append", default=[],
                    help="another version of the kernel file to time next to the current one: git:REV or a path")
    args = ap.parse_args()
    for spec in args.version:  # a bad one fails before any timing
        load_version(spec)
    print_figures("wall clock (ms, median of synchronized calls)",
                  gdn_micro(args.flavor, args.batch, args.seq, compiled=args.compiled, reps=args.reps))
    print_figures("GPU kernel time (ms per call, torch.profiler)",
                  kernel_comparison(args.flavor, args.batch, args.seq, tuple(args.version)))
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

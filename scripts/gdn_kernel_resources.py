"""Registers and spills of every Triton gated-delta-rule kernel config, compiled for a GPU
target on this machine (no GPU needed): what an autotuned config costs before it ever runs.

    python scripts/gdn_kernel_resources.py [--arch 90] [--only _fwd_state_kernel,...] [--module PATH]

Compiles each autotune config of each kernel in fusion_titan/ops/gated_delta_rule_triton.py (or
--module) at fusion_1b's GDN shapes (K 64, V 128, bf16 inputs, chunk 64, B4 T4096 H8, with the
JIT's divisibility specializations of those shapes) for sm_<arch>, and prints
per config cuobjdump's REG (registers per thread; 255 is the ceiling), STACK (bytes per thread
spilled to local memory: slow) and the dynamic shared memory, with the wgmma / mma instruction
counts of the PTX (wgmma: Hopper's asynchronous tensor-core path).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FP32_POINTERS = {"G_ptr", "Tm_ptr", "h0_ptr", "ht_ptr", "dht_ptr", "dh0_ptr", "g_ptr", "dg_ptr"}


def load(path: Path):
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("gdn_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_config(fn, cfg, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    consts = dict(K=64, V=128, BT=64, BK=64, PREC="tf32", HAS_H0=True, STORE_FINAL=True, HAS_DHT=True,
                  **cfg.kwargs)
    consts = {k: v for k, v in consts.items() if k in params}
    sig = {p: "constexpr" if p in consts else
           ("*fp32" if p in FP32_POINTERS else "*bf16") if p.endswith("_ptr") else
           "fp32" if p == "scale" else "i32" for p in params}
    # what the JIT specializes at these shapes: 16-byte aligned pointers and the ints that are
    # multiples of 16 (T = Tp = 4096, N = 64; H = 8 is not) get tt.divisibility 16, which lets
    # loads vectorize (without it the figures are not those of the kernels the GPU runs)
    divisible = [i for i, p in enumerate(params) if p not in consts and (p.endswith("_ptr") or p in ("T", "Tp", "N"))]
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ptx = kernel.asm["ptx"]
    return {"regs": int(found.group(1)) if found else None, "stack": int(found.group(2)) if found else None,
            "dyn_smem": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    ap.add_argument("--only", default="", help="comma list of kernel names")
    ap.add_argument("--module", type=Path, default=ROOT / "fusion_titan" / "ops" / "gated_delta_rule_triton.py")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    mod = load(args.module)
    import triton

    tuned = [n for n, v in vars(mod).items() if isinstance(v, triton.runtime.autotuner.Autotuner)]
    names = [n for n in args.only.split(",") if n] or tuned  # the module's kernels, in file order
    print(f"| kernel | config | warps | stages | REG | STACK (spill bytes) | dyn. shared | wgmma | mma |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        tuned = getattr(mod, name)
        for cfg in tuned.configs:
            r = compile_config(tuned.fn, cfg, args.arch)
            print(f"| {name} | {cfg.kwargs or ''} | {cfg.num_warps} | {cfg.num_stages} | {r['regs']} | "
                  f"{r['stack']} | {r['dyn_smem']} | {r['wgmma']} | {r['mma']} |", flush=True)


if __name__ == "__main__":
    main()

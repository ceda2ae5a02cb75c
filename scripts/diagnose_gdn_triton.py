"""Which kernel and autotune config of the Triton gated delta rule faults or is wrong on this GPU.

    python scripts/diagnose_gdn_triton.py [--module PATH ...] [--out FILE]

Each case runs in its own process (an illegal memory access poisons the CUDA context) with
CUDA_LAUNCH_BLOCKING=1, so a fault's traceback names the kernel that made it: every autotuned
kernel pinned to its config 0, 1, 2 in turn (one config: no benchmarking), with
FUSION_GDN_TRANSPOSE_VIA_MEMORY=0 and =1 (a switch of the gdn-blocked branch's kernels, ignored by
others); `--module` adds other versions of gated_delta_rule_triton.py (e.g. a branch's, copied to
a file), autotuned and pinned to the same configs.
A case that runs reports the relative error of o, the final state and every gradient against
the float64 recurrence on the CPU (tests/test_gated_delta_rule_triton.py's bf16 case and
tolerances: 2e-2 outputs, 5e-2 gradients), as one JSON line per case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["q", "k", "v", "g", "beta", "h0"]


def child(module_path: str, config: int | None) -> dict:
    import torch
    import triton

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the test module imports its helpers by name
    from tests.test_gated_delta_rule_triton import _bf16_case, reference_and_grads, rel_err

    spec = importlib.util.spec_from_file_location("gdn_under_test", module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if config is not None:
        for obj in vars(mod).values():
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                obj.configs = [obj.configs[min(config, len(obj.configs) - 1)]]
    inputs, do, dS = _bf16_case()
    o_ref, s_ref, g_ref = reference_and_grads(inputs, do, dS)
    dtypes = [torch.bfloat16] * 3 + [torch.float32, torch.bfloat16, torch.float32]
    leaves = [x.to("cuda", dt).requires_grad_() for x, dt in zip(inputs, dtypes)]
    o, s = mod.triton_chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    loss = (o.double() * do.cuda()).sum() + (s.double() * dS.cuda()).sum()
    grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    errors = {"o": rel_err(o.double().cpu(), o_ref), "state": rel_err(s.double().cpu(), s_ref)}
    errors.update({f"d{n}": rel_err(a.double().cpu(), b) for n, a, b in zip(NAMES, grads, g_ref)})
    ok = all(v < (2e-2 if k in ("o", "state") else 5e-2) for k, v in errors.items())
    return {"status": "ok" if ok else "wrong", "errors": {k: float(f"{v:.3g}") for k, v in errors.items()}}


def run_case(case: dict) -> dict:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1",
               FUSION_GDN_TRANSPOSE_VIA_MEMORY="1" if case["via_memory"] else "0")
    cmd = [sys.executable, __file__, "--child", case["module"]]
    if case["config"] is not None:
        cmd += ["--config", str(case["config"])]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {**case, "status": "timeout (600 s)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return {**case, **json.loads(lines[-1])}
    trace = proc.stderr.strip().splitlines()
    kernels = [ln.strip() for ln in trace if "_kernel[" in ln or "_kernel(" in ln]
    return {**case, "status": "fault", "kernel_lines": kernels[-3:], "tail": trace[-4:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", default=[], help="another gated_delta_rule_triton.py to try")
    ap.add_argument("--configs", type=int, nargs="+", default=[0, 1, 2], help="config indices to pin")
    ap.add_argument("--out", help="also write the JSON lines here, each as its case ends")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config)))
        return
    ours = str(ROOT / "fusion_titan/ops/gated_delta_rule_triton.py")
    cases = [{"module": ours, "config": c, "via_memory": m} for m in (False, True) for c in args.configs]
    cases += [{"module": path, "config": c, "via_memory": True} for path in args.module
              for c in (None, *args.configs)]  # autotuned, then pinned like ours
    with ThreadPoolExecutor(len(cases)) as pool:
        for done in as_completed([pool.submit(run_case, case) for case in cases]):
            result = done.result()
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()

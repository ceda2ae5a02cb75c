"""Throughput and MFU of the real training path on a GPU, against torchtitan's own DeepSeek-V3.

    python scripts/benchmark.py [--config train_configs/fusion_1b.toml] [--steps 20] [--warmup 8]
        [--suites peer,ablations,micro,speed] [--only NAME,...] [--profile NAME] [--out DIR]

Suites (every figure a ratio against a reference measured in the same invocation):
  peer       ours (the TOML as is), ours matched (AdamW, no MTP) and torchtitan's deepseek_v3 at
             matched size (fusion_titan/bench/deepseek_peer.py), these two at batch 4 (the peer's
             largest on 80 GB) -> tokens/s ratio ours / theirs.
  ablations  one change each against "ours": attention backend, compile off, activation
             checkpointing modes, float8 (torchao), NorMuon vs AdamW, CE implementation.
  speed      issue 17: ours, ours as main was before it (legacy MoE dispatch, per-submodule
             compile, PyTorch gated delta rule), the peer, then each change toggled alone (SPEED_RUNS).
  micro      in-process: optimizer step time NorMuon vs AdamW on the flavor's parameters, and the
             Gated DeltaNet op (ours chunked vs fla where its kernels run correctly).

Each trainer run is `./run_train.sh <config> --training.steps S ...` in a subprocess (the exact
path users run: torchtitan Trainer, our spec, FSDP2, compile, AC, loss, optimizer); tokens/s,
MFU (torchtitan's: the model's FLOPs/token count over the device's dense BF16 peak, 989 TFLOP/s
for an H100 SXM) and peak reserved memory are read from its log, averaged over the steps after
--warmup. `--profile NAME` takes a torch.profiler trace of one step of that run and prints the
top GPU kernels and the GPU-busy fraction of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_titan.bench.trace_summary import PROFILE_FOLDER, profiler_overrides, summarize_trace  # noqa: E402
from fusion_titan.bench.train_log import parse_steps, run_captured, strip_ansi  # noqa: E402

PEER = ["--experimental.custom_import", "fusion_titan.bench.deepseek_peer",
        "--model.name", "deepseek_v3_peer"]
MATCHED = ["--optimizer.name", "AdamW", "--model.mtp_depth", "0"]

# The peer needs 77 GiB at batch 4 (twice that at fusion_1b.toml's batch 8 would not fit an 80 GB
# GPU): the peer suite compares at batch 4; the speed suite has both models at both batches.
PEER_BATCH = ["--training.local_batch_size", "4"]
PEER_RUNS = {
    "ours": [],
    "ours_matched": MATCHED + PEER_BATCH,
    "deepseek_v3": PEER + ["--optimizer.name", "AdamW"] + PEER_BATCH,
}
# NorMuon's Newton-Schulz work is per optimizer step: its share of the step falls with the tokens
# per step, so it is measured at the TOML's batch and with 4 micro-batches per step (131K tokens).
GRAD_ACCUM_4 = ["--training.global_batch_size", "32"]
ABLATION_RUNS = {  # in priority order (a time-limited device call may not reach the last)
    "normuon": ["--optimizer.name", "NorMuon"],
    "ours_accum_4": GRAD_ACCUM_4,
    "normuon_accum_4": ["--optimizer.name", "NorMuon", *GRAD_ACCUM_4],
    "float8": ["--model.converters", "quantize.linear.float8",
               "--quantize.linear.float8.recipe_name", "tensorwise"],
    "attn_flex": ["--model.attn_backend", "flex"],
    "ac_full": ["--activation_checkpoint.mode", "full"],
    "ac_every_2": ["--activation_checkpoint.mode", "selective",
                   "--activation_checkpoint.selective_ac_option", "2"],
    "ac_none": ["--activation_checkpoint.mode", "none"],
    "no_compile": ["--compile.no-enable"],
    "ce_liger": ["--loss.ce_impl", "liger"],
    "ce_chunked": ["--loss.ce_impl", "chunked"],
}
# Issue 17's changes, each toggled back one at a time against "ours" (in priority order).
TODAYS_MAIN = ["--model.moe_dispatch", "legacy", "--compile.granularity", "submodules",
               "--model.gdn_backend", "torch"]
SPEED_RUNS = {
    "ours": [],
    "ours_main_today": TODAYS_MAIN,
    "deepseek_v3": PEER + ["--optimizer.name", "AdamW"],  # at the TOML's batch, like ours
    "dispatch_legacy": ["--model.moe_dispatch", "legacy"],
    "compile_submodules": ["--compile.granularity", "submodules"],
    "gdn_torch": ["--model.gdn_backend", "torch"],
    # = ours since Session 8 ("auto" takes the Triton custom ops under compile); gdn_torch toggles back
    "gdn_triton": ["--model.gdn_backend", "triton"],
    "group_align_1": ["--model.moe_group_align", "1"],
    "combine_einsum": ["--model.moe_combine", "einsum"],  # the top-k combine before Session 8
    "cudagraphs": ["--compile.cudagraphs"],
    "batch_4": ["--training.local_batch_size", "4"],
    # more of the H200's 141 GB for ours (the peer's batch 8 takes 134 GiB; 16 is not measured)
    "batch_16": ["--training.local_batch_size", "16"],
    "deepseek_v3_batch_4": PEER_RUNS["deepseek_v3"],
    "cce_exact": ["--loss.cce_filter_eps", "off"],
    "cce_eps_1e-3": ["--loss.cce_filter_eps", "1e-3"],
}


def train_run(name: str, config: str, overrides: list[str], steps: int, warmup: int,
              out: Path, profile: bool, timeout: int) -> dict:
    dump = out / name
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", str(steps),
           "--metrics.log_freq", "1", "--checkpoint.no-enable", *overrides]
    if profile:
        cmd += profiler_overrides(steps)
    env = dict(os.environ, CONFIG_FILE=config, NGPU=os.environ.get("NGPU", "1"))
    t0 = time.time()
    log, rc = run_captured(cmd, ROOT, env, timeout)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "bench.log").write_text(log)
    result = {"name": name, "overrides": " ".join(overrides), "rc": rc,
              "wall_s": round(time.time() - t0, 1)}
    measured = [v for s, v in parse_steps(log).items() if s > warmup]
    if rc != 0 or not measured:
        tail = [ln for ln in strip_ansi(log).splitlines() if ln.strip()][-6:]
        result["error"] = " | ".join(tail)[-800:]
        return result
    result["tps"] = statistics.mean(v["tps"] for v in measured)
    mfus = [v["mfu"] for v in measured if v["mfu"] is not None]
    result["mfu"] = statistics.mean(mfus) if mfus else None
    result["mem_gib"] = max(v["mem_gib"] for v in measured)
    result["steps_measured"] = len(measured)
    if profile:
        result["profile"] = summarize_trace(dump / PROFILE_FOLDER)
    return result


# ---------------------------------------------------------------------------
# in-process micro benchmarks
# ---------------------------------------------------------------------------


def _cuda_time(fn, reps: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def optimizer_micro(flavor: str) -> dict:
    """One optimizer step on the flavor's parameters (fp32 master weights, random gradients)."""
    import torch
    from types import SimpleNamespace

    from fusion_titan.model.flavors import FLAVORS
    from fusion_titan.model.model import FusionModel
    from fusion_titan.training.optimizer import _optimizer_factory

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FusionModel(FLAVORS[flavor])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name in ("AdamW", "NorMuon"):
        cfg = SimpleNamespace(name=name, lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                              weight_decay=0.1, muon_lr=0.02,
                              # NorMuon refuses torch's kernel choice, torchtitan's default excepted
                              implementation="foreach" if name == "AdamW" else "fused",
                              muon_momentum=0.95, muon_beta2=0.95, muon_weight_decay=0.0,
                              ns_steps=5, muon_update_scale="muon", muon_bucket_mb=512.0)
        opt = _optimizer_factory(cfg)(model)
        out[f"{name}_step_ms"] = _cuda_time(opt.step) * 1e3
        del opt
        torch.cuda.empty_cache()
    out["normuon_over_adamw"] = out["NorMuon_step_ms"] / out["AdamW_step_ms"]
    return out


def gdn_inputs(flavor: str, batch: int, seq: int) -> tuple[str, list]:
    """(shape label, [q, k, v, g, beta] leaves) of the gated delta rule at the flavor's GDN shapes,
    as the layer feeds it: l2-normalized q / k, bf16 values, log decays <= 0 in fp32."""
    import torch
    import torch.nn.functional as F

    from fusion_titan.model.flavors import FLAVORS

    a = FLAVORS[flavor]
    H, K, V = a.gdn_n_heads, a.gdn_head_k_dim, a.gdn_head_v_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k = F.normalize(mk(batch, seq, H, K), dim=-1), F.normalize(mk(batch, seq, H, K), dim=-1)
    v = mk(batch, seq, H, V)
    gate = -F.softplus(mk(batch, seq, H).float())
    beta = torch.sigmoid(mk(batch, seq, H).float()).to(torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gate, beta)]
    return f"B{batch} T{seq} H{H} K{K} V{V} bf16", leaves


def gdn_fwd_bwd(fn, leaves: list, do):
    """A call running a gated delta rule op forward and back from the fixed output gradient `do`,
    into fresh gradients (nothing accumulates in .grad): only the op's own kernels run, where a
    loss such as o.float().square().mean() added four elementwise kernels (~0.17 ms at B4 T4096)."""
    import torch

    return lambda: torch.autograd.grad(fn(*leaves)[0], leaves, do)


def gdn_micro(flavor: str, batch: int, seq: int, compiled: bool = True, reps: int = 5) -> dict:
    """Gated delta rule op at the flavor's shapes: ours in PyTorch (eager, compiled) and in Triton
    vs fla (forward; backward too where fla_is_safe()). Ratios are over fla's forward."""
    import torch

    from fusion_titan.ops.gated_delta_rule import chunk_gated_delta_rule, fla_is_safe
    from fusion_titan.ops.gated_delta_rule_triton import triton_chunk_gated_delta_rule

    shape, leaves = gdn_inputs(flavor, batch, seq)

    def fwd(fn):
        return lambda: fn(*leaves)[0]

    do = torch.randn_like(leaves[2])  # o has v's shape and dtype

    def fwd_bwd(fn):
        return gdn_fwd_bwd(fn, leaves, do)

    def time_both(name, fn):
        out[f"{name}_fwd_ms"] = _cuda_time(fwd(fn), reps) * 1e3
        out[f"{name}_fwd_bwd_ms"] = _cuda_time(fwd_bwd(fn), reps) * 1e3

    out = {"shape": shape}
    time_both("ours_torch", lambda q, k, v, g_, b: chunk_gated_delta_rule(q, k, v, g_, b))
    if compiled:
        time_both("ours_torch_compiled", torch.compile(chunk_gated_delta_rule))  # as in the trainer
    time_both("ours_triton", lambda q, k, v, g_, b: triton_chunk_gated_delta_rule(q, k, v, g_, b))
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception as e:  # fla not installed
        out["fla"] = f"unavailable: {e}"
        return out
    fla = lambda q, k, v, g_, b: fla_chunk(q, k, v, g_, b)  # noqa: E731
    out["fla_fwd_ms"] = _cuda_time(fwd(fla), reps) * 1e3
    for key in [k for k in out if k.startswith("ours") and k.endswith("_ms")]:
        out[key.replace("_ms", "_over_fla_fwd")] = out[key] / out["fla_fwd_ms"]
    safe, why = fla_is_safe()
    if safe:
        out["fla_fwd_bwd_ms"] = _cuda_time(fwd_bwd(fla), reps) * 1e3
        out["ours_triton_over_fla_fwd_bwd"] = out["ours_triton_fwd_bwd_ms"] / out["fla_fwd_bwd_ms"]
    else:
        out["fla_backward"] = f"not run: {why}"
    return out


# ---------------------------------------------------------------------------


def table(results: list[dict], reference: str) -> str:
    ref = next((r for r in results if r["name"] == reference and "tps" in r), None)
    lines = [f"| run | overrides | tokens/s | x {reference} | MFU % | peak GiB | x {reference} mem |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "tps" not in r:
            lines.append(f"| {r['name']} | `{r['overrides']}` | failed (rc {r['rc']}): "
                         f"{r.get('error', '')[:300]} | | | | |")
            continue
        x = f"{r['tps'] / ref['tps']:.2f}" if ref else "-"
        xm = f"{r['mem_gib'] / ref['mem_gib']:.2f}" if ref else "-"
        mfu = f"{r['mfu']:.1f}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['name']} | `{r['overrides']}` | {r['tps']:,.0f} | {x} | {mfu} | "
                     f"{r['mem_gib']:.1f} | {xm} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/fusion_1b.toml")
    ap.add_argument("--flavor", default="fusion_1b", help="for the micro suite")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8, help="steps excluded from the averages")
    ap.add_argument("--suites", default="peer,ablations,micro")
    ap.add_argument("--only", default="", help="comma list of run names to keep")
    ap.add_argument("--profile", default="", help="comma list of run names to profile")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per trainer run")
    ap.add_argument("--out", default="outputs/benchmark")
    ap.add_argument("--extra", default="", help="overrides added to every trainer run")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    suites = set(args.suites.split(","))
    runs = {}
    if "peer" in suites:
        runs.update(PEER_RUNS)
    if "ablations" in suites:
        runs.setdefault("ours", [])
        runs.update(ABLATION_RUNS)
    if "speed" in suites:
        runs.update(SPEED_RUNS)
    only = set(filter(None, args.only.split(",")))
    profiled = set(filter(None, args.profile.split(",")))
    extra = args.extra.split()
    report = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "runs": []}
    save = lambda: (out / "report.json").write_text(json.dumps(report, indent=1))  # noqa: E731
    if "micro" in suites:  # first: cheap, and independent of the trainer runs
        import torch

        report["optimizer"] = optimizer_micro(args.flavor)
        print("optimizer step:", json.dumps(report["optimizer"]), flush=True)
        torch.cuda.empty_cache()
        report["gdn"] = gdn_micro(args.flavor, batch=4, seq=4096)
        print("gated delta rule:", json.dumps(report["gdn"]), flush=True)
        torch.cuda.empty_cache()
        save()
    results = report["runs"]
    for name, overrides in runs.items():
        if only and name not in only:
            continue
        r = train_run(name, args.config, overrides + extra, args.steps, args.warmup, out,
                      name in profiled, args.timeout)
        print(json.dumps(r), flush=True)
        results.append(r)
        save()
    if results:
        print("\n" + table(results, "ours"))
        theirs = next((r for r in results if r["name"] == "deepseek_v3" and "tps" in r), None)
        for mine in ("ours", "ours_matched"):
            r = next((r for r in results if r["name"] == mine and "tps" in r), None)
            if r and theirs:
                print(f"{mine} / torchtitan deepseek_v3 tokens/s: {r['tps'] / theirs['tps']:.2f}")
    save()
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    sys.exit(main())

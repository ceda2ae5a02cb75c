"""Measure a multi-GPU plan on one GPU: rank 0 of an N-rank run under torchtitan's fake backend.

    python scripts/fake_plan.py [--config train_configs/fusion_7b.toml] [--ngpu 8] [--steps 6]
        [--warmup 3] [--only NAME,...] [--out outputs/fake_plan] [-- extra overrides]

`[comm] mode = "fake_backend"` (torchtitan 0.2.2) starts one process that plays rank 0 of an
NGPU-rank plan: parameters, gradients, optimizer state, FSDP buffers and activations are the real
per-GPU ones and every kernel runs, but collectives move nothing (their outputs are not real data,
so losses are meaningless). What it measures is per-GPU peak memory and per-GPU compute time of a
step, without communication. Expert parallel runs with a mirrored token exchange
(fusion_titan/infra/fake_backend_ep.py).

Each variant trains `--steps` steps of one micro-batch per rank (global batch = local batch x
NGPU) and reports peak reserved memory, per-GPU tokens/s after `--warmup` steps and the time of
such a step (local batch x seq / tokens/s: forward, backward and optimizer). A recipe step with G
micro-batches costs about G x (step - optimizer) + optimizer; the optimizer's time is the
difference between two variants that differ only in it.
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

from fusion_titan.bench.train_log import parse_steps, run_captured, strip_ansi  # noqa: E402

VARIANTS = {
    "adamw_ep1": ["--optimizer.name", "AdamW", "--parallelism.expert_parallel_degree", "1"],
    "normuon_ep1": ["--optimizer.name", "NorMuon", "--parallelism.expert_parallel_degree", "1"],
    "normuon_ep8": ["--optimizer.name", "NorMuon", "--parallelism.expert_parallel_degree", "8"],
    "adamw_ep8": ["--optimizer.name", "AdamW", "--parallelism.expert_parallel_degree", "8"],
}


def run(name: str, args, overrides: list[str]) -> dict:
    dump = ROOT / args.out / name
    cmd = [sys.executable, "-m", "fusion_titan.train", "--job.config_file", args.config,
           "--job.dump_folder", str(dump), "--comm.mode", "fake_backend",
           "--training.steps", str(args.steps), "--metrics.log_freq", "1",
           "--checkpoint.no-enable", *overrides]
    env = dict(os.environ, NGPU=str(args.ngpu), LOCAL_RANK="0", RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    log, rc = run_captured(cmd, ROOT, env, args.timeout)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "fake_plan.log").write_text(log)
    result = {"name": name, "overrides": " ".join(overrides), "rc": rc,
              "wall_s": round(time.time() - t0, 1)}
    steps = parse_steps(log)
    measured = [v for s, v in steps.items() if s > args.warmup]
    if steps:
        result["peak_gib"] = max(v["mem_gib"] for v in steps.values())
    if measured:
        result["tps_per_gpu"] = statistics.mean(v["tps"] for v in measured)
        result["step_s"] = round(args.local_batch * args.seq_len / result["tps_per_gpu"], 3)
    if rc != 0 or not measured:
        tail = [ln for ln in strip_ansi(log).splitlines() if ln.strip()][-6:]
        result["error"] = " | ".join(tail)[-800:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/fusion_7b.toml")
    ap.add_argument("--ngpu", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from tokens/s")
    ap.add_argument("--only", default="", help="comma list of variants")
    ap.add_argument("--local-batch", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default="outputs/fake_plan")
    ap.add_argument("extra", nargs="*", help="overrides added to every variant")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    import tomllib

    with open(ROOT / args.config, "rb") as f:
        args.seq_len = tomllib.load(f)["training"]["seq_len"]
    for i, arg in enumerate(args.extra[:-1]):
        if arg == "--training.seq_len":
            args.seq_len = int(args.extra[i + 1])
    # the stdlib corpus: no prepared shards needed to measure memory and compute (later
    # overrides win, so `-- --data.source shards` measures with the TOML's data)
    common = ["--data.source", "stdlib", "--training.local_batch_size", str(args.local_batch),
              "--training.global_batch_size", str(args.local_batch * args.ngpu), *args.extra]
    results = []
    for name, overrides in VARIANTS.items():
        if only and name not in only:
            continue
        r = run(name, args, common + overrides)
        print(json.dumps(r), flush=True)
        results.append(r)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=1))
    print("\n| variant | peak GiB per GPU | tokens/s per GPU (compute only) | step s |\n|---|---|---|---|")
    for r in results:
        tps = f"{r['tps_per_gpu']:.0f}" if "tps_per_gpu" in r else r.get("error", "n/a")
        print(f"| {r['name']} | {r.get('peak_gib', 'n/a')} | {tps} | {r.get('step_s', 'n/a')} |")


if __name__ == "__main__":
    main()

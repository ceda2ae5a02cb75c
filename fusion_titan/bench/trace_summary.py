"""What one profiled training step spent its GPU time on, read from a torch.profiler chrome trace.

torchtitan's `[profiling]` writes `<folder>/iteration_<N>/rank<r>_trace.json` per rank.
`summarize_trace` ranks the GPU kernels of the step and measures how busy the GPU was;
`optimizer_share` splits the step at the optimizer: the kernels launched inside
`Optimizer.step#...` (torch's record_function around every optimizer's step, matched to their
launches by correlation id), its host (CPU) time, and the host syncs and cudaMalloc/cudaFree
calls inside and outside it. `summarize_ranks` does both for every rank of a folder, so ranks
that wait on each other (expert parallel's all-to-all behind an overloaded rank) show up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OPTIMIZER_STEP = "Optimizer.step#"
PROFILE_FOLDER = "prof"  # under the run's dump folder
# host-side calls that wait for the device, and the allocator's slow path
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")
ALLOC_CALLS = ("cudaMalloc", "cudaFree")


def _events(trace: Path) -> list[dict]:
    return json.loads(trace.read_text())["traceEvents"]


def _kernels(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def profiler_overrides(steps: int) -> list[str]:
    """Trainer overrides that trace step `steps - 1` into <dump folder>/PROFILE_FOLDER."""
    return ["--profiling.enable_profiling", "--profiling.profile_freq", str(steps - 1),
            "--profiling.save_traces_folder", PROFILE_FOLDER]


def _time_by_name(kernels: list[dict]) -> list[tuple[str, float]]:
    """(kernel name, its summed duration in us), longest first."""
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e["name"][:90]] = by_name.get(e["name"][:90], 0.0) + e["dur"]
    return sorted(by_name.items(), key=lambda kv: -kv[1])


def summarize_trace(folder: Path, top: int = 15, rank: int = 0) -> dict:
    """Top GPU kernels of the profiled step (of `rank`) and how busy the GPU was during it."""
    traces = sorted(folder.rglob(f"rank{rank}_trace.json"))
    if not traces:
        return {"error": f"no trace under {folder}"}
    return step_summary(_events(traces[-1]), top)


def step_summary(events: list[dict], top: int = 15) -> dict:
    """summarize_trace of one trace's events."""
    kernels = _kernels(events)
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    if not kernels:
        return {"error": "no kernel events"}
    busy = sum(e["dur"] for e in kernels)
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels))
    step_us = max((e["dur"] for e in steps), default=span)
    return {"step_ms": step_us / 1e3, "gpu_busy_ms": busy / 1e3,
            "gpu_busy_fraction": busy / step_us if step_us else None,
            "n_kernels": len(kernels),
            "top": [(name, round(us / 1e3, 2), round(us / busy, 3))
                    for name, us in _time_by_name(kernels)[:top]]}


def optimizer_share(events: list[dict], top: int = 8) -> dict:
    """The optimizer step's part of a trace: its host time, the GPU time and count of the kernels
    it launched (top kernels among them), the NCCL kernel time inside and outside it, and the
    host syncs / allocator calls inside and outside it."""
    steps = [e for e in events if str(e.get("name", "")).startswith(OPTIMIZER_STEP)
             and "dur" in e and e.get("cat") in ("user_annotation", "cpu_op")]
    if not steps:
        return {"error": f"no {OPTIMIZER_STEP}... range in the trace"}
    outer = max(steps, key=lambda e: e["dur"])  # the container's step holds the inner rules'
    t0, t1 = outer["ts"], outer["ts"] + outer["dur"]
    inside = lambda e: (t0 <= e["ts"] <= t1 and e.get("pid") == outer.get("pid")  # noqa: E731
                      and e.get("tid") == outer.get("tid"))
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e]
    launched = {e["args"]["correlation"] for e in runtime
                if inside(e) and "correlation" in e.get("args", {})}
    kernels = _kernels(events)
    opt_kernels = [e for e in kernels if e.get("args", {}).get("correlation") in launched]
    nccl = lambda ks: sum(e["dur"] for e in ks if "nccl" in e["name"].lower()) / 1e3  # noqa: E731
    calls = lambda names, where: sum(  # noqa: E731
        1 for e in runtime if e["name"] in names and where(e))
    return {
        "optimizer_host_ms": outer["dur"] / 1e3,
        "optimizer_gpu_ms": sum(e["dur"] for e in opt_kernels) / 1e3,
        "optimizer_kernels": len(opt_kernels),
        "optimizer_nccl_ms": nccl(opt_kernels),
        "other_nccl_ms": nccl([e for e in kernels
                               if e.get("args", {}).get("correlation") not in launched]),
        "optimizer_syncs": calls(SYNC_CALLS, inside),
        "other_syncs": calls(SYNC_CALLS, lambda e: not inside(e)),
        "optimizer_alloc_calls": calls(ALLOC_CALLS, inside),
        "other_alloc_calls": calls(ALLOC_CALLS, lambda e: not inside(e)),
        "optimizer_top": [(name, round(us / 1e3, 2)) for name, us in _time_by_name(opt_kernels)[:top]],
    }


def summarize_ranks(folder: Path, top: int = 15) -> dict[int, dict]:
    """{rank: summarize_trace + optimizer_share} for every rank<r>_trace.json of the last
    profiled iteration under `folder`."""
    traces = sorted(folder.rglob("rank*_trace.json"))
    if not traces:
        return {}
    last = max({t.parent for t in traces}, key=lambda d: _iteration(d.name))
    out = {}
    for trace in sorted(last.glob("rank*_trace.json")):
        rank = int(re.search(r"rank(\d+)_trace", trace.name)[1])
        events = _events(trace)  # one parse per trace (they run to hundreds of MB)
        out[rank] = {**step_summary(events, top), **optimizer_share(events)}
    return out


def _iteration(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m[1]) if m else -1


def format_ranks(title: str, ranks: dict[int, dict]) -> str:
    """A plain-text report of `summarize_ranks` (one flat file per profiled run)."""
    if not ranks:
        return f"# {title}\nno traces found\n"
    keys = ("step_ms", "gpu_busy_ms", "gpu_busy_fraction", "n_kernels", "optimizer_host_ms",
            "optimizer_gpu_ms", "optimizer_kernels", "optimizer_nccl_ms", "other_nccl_ms",
            "optimizer_syncs", "other_syncs", "optimizer_alloc_calls", "other_alloc_calls")
    lines = [f"# {title}", "", "| rank | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for rank, s in sorted(ranks.items()):
        cells = [f"{s[k]:.3f}" if isinstance(s.get(k), float) else str(s.get(k, "")) for k in keys]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    for rank, s in sorted(ranks.items()):
        if "error" in s:
            lines.append(f"rank {rank}: {s['error']}")
        lines += ["", f"## rank {rank}: top GPU kernels of the step (name, ms, share of busy)"]
        lines += [f"- {ms:9.2f} ms  {share:.3f}  {name}" for name, ms, share in s.get("top", [])]
        lines += ["", f"## rank {rank}: top GPU kernels launched by the optimizer step (name, ms)"]
        lines += [f"- {ms:9.2f} ms  {name}" for name, ms in s.get("optimizer_top", [])]
    return "\n".join(lines) + "\n"

"""The profiled-step summary (scripts/two_gpu_checks.py --profile): kernels launched inside the
optimizer step are told from the rest by their launches' correlation ids, per rank."""

import json

import torch

from fusion_titan.bench.trace_summary import format_ranks, optimizer_share, summarize_ranks

HOST = dict(pid=7, tid=1)


def _trace(opt_ms: float) -> list[dict]:
    """A step of 1000 us: backward kernels (one NCCL), then an optimizer step from ts 500 to
    500 + opt_ms*1000 launching a matmul and an all-to-all, a sync and a malloc in it."""
    end = 500 + int(opt_ms * 1000)
    launch = lambda ts, corr: {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": ts,  # noqa: E731
                               "dur": 5, "args": {"correlation": corr}, **HOST}
    kernel = lambda name, ts, dur, corr: {"name": name, "cat": "kernel", "ts": ts, "dur": dur,  # noqa: E731
                                          "pid": 0, "tid": 7, "args": {"correlation": corr}}
    return [
        {"name": "ProfilerStep#9", "cat": "user_annotation", "ts": 0, "dur": 1000, **HOST},
        {"name": "Optimizer.step#HybridOptimizer.step", "cat": "user_annotation", "ts": 500,
         "dur": end - 500, **HOST},
        {"name": "Optimizer.step#NorMuon.step", "cat": "user_annotation", "ts": 510,
         "dur": end - 520, **HOST},
        # the GPU-side copy of the annotation is not the host range
        {"name": "Optimizer.step#HybridOptimizer.step", "cat": "gpu_user_annotation", "ts": 0,
         "dur": 5000, "pid": 0, "tid": 7},
        launch(10, 1), kernel("bwd_gemm", 20, 300, 1),
        launch(20, 2), kernel("ncclDevKernel_ReduceScatter", 330, 100, 2),
        launch(520, 3), kernel("ns_bmm", 530, 200, 3),
        launch(530, 4), kernel("ncclDevKernel_SendRecv", 740, 50, 4),
        {"name": "cudaStreamSynchronize", "cat": "cuda_runtime", "ts": 540, "dur": 10, **HOST},
        {"name": "cudaStreamSynchronize", "cat": "cuda_runtime", "ts": 100, "dur": 10, **HOST},
        {"name": "cudaMalloc", "cat": "cuda_runtime", "ts": 545, "dur": 10, **HOST},
        # a launch by another thread during the optimizer's time is not the optimizer's
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 560, "dur": 5, "pid": 7,
         "tid": 2, "args": {"correlation": 5}},
        kernel("other_thread", 800, 10, 5),
    ]


def test_optimizer_share_counts_only_what_the_optimizer_launched():
    s = optimizer_share(_trace(0.4))
    assert s["optimizer_host_ms"] == 0.4
    assert s["optimizer_kernels"] == 2 and s["optimizer_gpu_ms"] == 0.25
    assert s["optimizer_nccl_ms"] == 0.05 and s["other_nccl_ms"] == 0.1
    assert s["optimizer_syncs"] == 1 and s["other_syncs"] == 1
    assert s["optimizer_alloc_calls"] == 1 and s["other_alloc_calls"] == 0
    assert s["optimizer_top"] == [("ns_bmm", 0.2), ("ncclDevKernel_SendRecv", 0.05)]
    assert "error" in optimizer_share([e for e in _trace(0.4) if "Optimizer" not in e["name"]])


def test_summarize_ranks_reads_every_rank_of_the_last_iteration(tmp_path):
    for iteration, opt_ms in ((4, 0.1), (9, 0.4)):
        folder = tmp_path / "prof" / f"iteration_{iteration}"
        folder.mkdir(parents=True)
        for rank in (0, 1):
            trace = _trace(opt_ms + 0.1 * rank)
            (folder / f"rank{rank}_trace.json").write_text(json.dumps({"traceEvents": trace}))
    ranks = summarize_ranks(tmp_path / "prof")
    assert sorted(ranks) == [0, 1]
    assert ranks[0]["optimizer_host_ms"] == 0.4 and abs(ranks[1]["optimizer_host_ms"] - 0.5) < 1e-9
    assert ranks[0]["step_ms"] == 1.0 and ranks[0]["n_kernels"] == 5
    text = format_ranks("fsdp2_ep2_normuon", ranks)
    assert text.count("\n| 0 | 1.000 |") == 1 and "ns_bmm" in text
    assert summarize_ranks(tmp_path / "nothing") == {}


def test_a_real_profiler_trace_names_the_optimizer_step(tmp_path):
    """torch's own trace of an optimizer step (CPU: no kernels) has the host range found here."""
    from fusion_titan.optim import NorMuon
    from fusion_titan.optim.hybrid import HybridOptimizer

    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = HybridOptimizer({"normuon": NorMuon([w])})
    w.grad = torch.randn(8, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    path = tmp_path / "rank0_trace.json"
    prof.export_chrome_trace(str(path))
    s = optimizer_share(json.loads(path.read_text())["traceEvents"])
    assert "error" not in s, s
    assert s["optimizer_host_ms"] > 0 and s["optimizer_kernels"] == 0

"""The benchmark harness's pieces that run without a GPU: the matched peer and the log parser."""

import importlib.util
from pathlib import Path

import torch

from fusion_titan.bench.deepseek_peer import matched_args
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.flops import count_params
from fusion_titan.model.model import FusionModel

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_matches_our_flavor_shape():
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model

    ours = FLAVORS["fusion_1b"]
    peer = matched_args("fusion_1b")
    peer.moe_impl = "standard"  # set by update_from_config in a real run
    for a, b in [("dim", "dim"), ("n_layers", "n_layers"), ("vocab_size", "vocab_size"),
                 ("n_heads", "n_heads"), ("kv_lora_rank", "kv_lora_rank"),
                 ("q_lora_rank", "q_lora_rank"), ("moe_inter_dim", "moe_inter_dim")]:
        assert getattr(ours, a) == getattr(peer, b), a
    assert peer.moe_args.num_experts == ours.n_routed_experts
    assert peer.moe_args.top_k == ours.n_activated_experts
    with torch.device("meta"):
        theirs = DeepSeekV3Model(peer)
        mine = FusionModel(ours)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    trunk = count_params(mine, ours).trunk_total  # ours without its MTP module
    # Same trunk up to the mixer of the dense-FFN layers (MLA there, Gated DeltaNet in ours);
    # theirs adds an untied output head (vocab x dim).
    untied_head = ours.vocab_size * ours.dim
    assert abs(n_theirs - untied_head - trunk) / trunk < 0.03, (n_theirs, trunk)


def test_log_parser_reads_torchtitan_step_lines():
    bench = _load_benchmark()
    log = ("\x1b[31mstep: 12  \x1b[32mloss:  6.1234  \x1b[38;2;180;60;0mgrad_norm:  0.51  "
           "\x1b[38;2;54;234;195mmemory: 25.80GiB(32.61%)  \x1b[34mtps: 28,123  "
           "\x1b[36mtflops: 143.21  \x1b[35mmfu: 14.48%\x1b[39m\n"
           "step: 13  loss:  6.0  grad_norm:  0.5  memory: 26.00GiB(33%)  tps: 28,000  "
           "tflops: 142.0  mfu: 14.40%\n")
    steps = bench.parse_steps(log)
    assert steps[12] == {"loss": 6.1234, "mem_gib": 25.8, "tps": 28123.0, "mfu": 14.48}
    assert steps[13]["tps"] == 28000.0 and steps[13]["loss"] == 6.0


def test_trace_summary_ranks_kernels_and_measures_gpu_busy(tmp_path):
    import json

    bench = _load_benchmark()
    events = [
        {"name": "ProfilerStep#9", "cat": "user_annotation", "ts": 0, "dur": 1000},
        {"name": "gemm_a", "cat": "kernel", "ts": 10, "dur": 300},
        {"name": "gemm_a", "cat": "kernel", "ts": 400, "dur": 200},
        {"name": "copy_b", "cat": "kernel", "ts": 700, "dur": 100},
        {"name": "cpu_op", "cat": "cpu_op", "ts": 0, "dur": 900},  # not a GPU kernel
    ]
    folder = tmp_path / "prof" / "iteration_9"
    folder.mkdir(parents=True)
    (folder / "rank0_trace.json").write_text(json.dumps({"traceEvents": events}))
    summary = bench.summarize_trace(tmp_path / "prof")
    assert summary["step_ms"] == 1.0 and summary["gpu_busy_ms"] == 0.6
    assert summary["gpu_busy_fraction"] == 0.6 and summary["n_kernels"] == 3
    assert summary["top"] == [("gemm_a", 0.5, 0.833), ("copy_b", 0.1, 0.167)]
    assert "error" in bench.summarize_trace(tmp_path / "nothing")


def test_speed_suite_overrides_parse_against_fusion_1b():
    """Every speed-suite row is a valid command line for fusion_1b.toml (the device run's dry run)."""
    from torchtitan.config import ConfigManager

    bench = _load_benchmark()
    seen = {}
    for name, overrides in bench.SPEED_RUNS.items():
        cfg = ConfigManager().parse_args(
            ["--job.config_file", str(ROOT / "train_configs" / "fusion_1b.toml"), *overrides])
        seen[name] = cfg
    assert seen["ours"].model.moe_dispatch is None and seen["ours"].compile.granularity == "block"
    assert seen["ours_main_today"].model.moe_dispatch == "legacy"
    assert seen["ours_main_today"].compile.granularity == "submodules"
    assert seen["cudagraphs"].compile.cudagraphs is True
    assert seen["group_align_1"].model.moe_group_align == 1
    assert seen["combine_einsum"].model.moe_combine == "einsum"
    assert seen["cce_exact"].loss.cce_filter_eps == "off"
    assert seen["ours"].training.local_batch_size == 8
    assert seen["batch_4"].training.local_batch_size == 4
    assert seen["batch_16"].training.local_batch_size == 16
    assert seen["deepseek_v3_batch_4"].training.local_batch_size == 4
    assert seen["deepseek_v3_batch_4"].model.name == "deepseek_v3_peer"


def test_ablation_rows_with_gradient_accumulation_parse_against_fusion_1b():
    """normuon_accum_4 / ours_accum_4: 4 micro-batches per optimizer step on one GPU."""
    from torchtitan.config import ConfigManager

    bench = _load_benchmark()
    for name in ("ours_accum_4", "normuon_accum_4"):
        cfg = ConfigManager().parse_args(
            ["--job.config_file", str(ROOT / "train_configs" / "fusion_1b.toml"), *bench.ABLATION_RUNS[name]])
        assert cfg.training.global_batch_size == 4 * cfg.training.local_batch_size
    assert ConfigManager().parse_args(
        ["--job.config_file", str(ROOT / "train_configs" / "fusion_1b.toml"),
         *bench.ABLATION_RUNS["normuon_accum_4"]]).optimizer.name == "NorMuon"

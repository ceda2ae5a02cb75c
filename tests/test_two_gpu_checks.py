"""scripts/two_gpu_checks.py's pieces that run without a GPU: run names, seed loading, the
per-run step statistics and the flat output folder."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from test_eval import script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return script("two_gpu_checks")


def test_run_names_give_gpus_and_overrides_that_parse():
    from torchtitan.config import ConfigManager

    script = _script()
    assert script.named_run("fsdp2") == (2, 2, [])
    ngpu, batches, extra = script.named_run("fsdp2_ep2_normuon")
    assert (ngpu, batches) == (2, 2)
    runner = script.Runner(SimpleNamespace(out="outputs/x", steps=3, local_batch=4, extra=[]))
    cmd = runner.command(Path("d"), ["--checkpoint.enable", "--checkpoint.load_only", *extra], batches)
    cfg = ConfigManager().parse_args(
        ["--job.config_file", str(ROOT / "train_configs" / "fusion_1b.toml"), *cmd[1:]])
    assert cfg.optimizer.name == "NorMuon" and cfg.parallelism.expert_parallel_degree == 2
    assert cfg.checkpoint.enable and cfg.checkpoint.load_only  # loads the seed, saves nothing
    assert (cfg.training.local_batch_size, cfg.training.global_batch_size) == (4, 8)
    # the 1-GPU reference of the same per-GPU work: one local batch per optimizer step
    ngpu, batches, extra = script.named_run("one_gpu_no_accum_normuon")
    cfg = ConfigManager().parse_args(["--job.config_file", str(ROOT / "train_configs" / "fusion_1b.toml"),
                                      *runner.command(Path("d"), extra, batches)[1:]])
    assert ngpu == 1 and cfg.training.global_batch_size == cfg.training.local_batch_size == 4
    assert cfg.optimizer.name == "NorMuon"
    with pytest.raises(SystemExit, match="unknown run"):
        script.named_run("fsdp4")


def test_step_stats_average_the_measured_steps_only():
    runner = _script().Runner(SimpleNamespace(out="outputs/x", warmup=2))
    scalars = {"moe/mean_max_over_mean_ep_rank_load": {1: 9.0, 2: 9.0, 3: 1.2, 4: 1.4},
               "memory/num_alloc_retries": {1: 5.0, 2: 6.0, 3: 6.0, 4: 9.0}}  # cumulative
    stats = runner.step_stats(scalars)
    assert stats == {"ep_rank_load_max_over_mean": pytest.approx(1.3), "alloc_retries": 3.0}
    # no warm-up step logged: the counter started at 0
    assert runner.step_stats({"memory/num_alloc_retries": {3: 1.0, 4: 4.0}}) == {"alloc_retries": 4.0}
    assert runner.step_stats({}) == {}  # a run without EP or TensorBoard: nothing to report


def test_flatten_keeps_only_top_level_files_and_each_runs_log(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    run = tmp_path / "fsdp2_ep2_normuon_profile"
    (run / "prof" / "iteration_11").mkdir(parents=True)
    (run / "prof" / "iteration_11" / "rank0_trace.json").write_text("{}")
    (run / "fsdp2_ep2_normuon_profile.log").write_text("step: 1")
    (tmp_path / "seed" / "checkpoint" / "step-0").mkdir(parents=True)
    _script().flatten(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp2_ep2_normuon_profile.log", "report.json"]
    assert (tmp_path / "fsdp2_ep2_normuon_profile.log").read_text() == "step: 1"


def test_pack_holds_the_summaries_and_each_runs_log_only(tmp_path):
    import tarfile

    out = tmp_path / "out"
    (out / "fsdp2" / "checkpoint" / "step-0").mkdir(parents=True)
    (out / "fsdp2" / "checkpoint" / "step-0" / "shard.distcp").write_text("weights")
    (out / "fsdp2" / "fsdp2.log").write_text("step: 1")
    (out / "report.json").write_text("{}")
    (out / "profile_fsdp2.md").write_text("# profile")
    archive = out / "two_gpu.tgz"  # inside --out: not packed into itself
    _script().pack(out, archive)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["fsdp2.log", "profile_fsdp2.md", "report.json"]
        assert tar.extractfile("fsdp2.log").read() == b"step: 1"


def test_a_call_ended_by_timeout_still_packs_what_it_wrote(tmp_path, monkeypatch):
    """`timeout` ends a device call with SIGTERM: the summaries written so far must still be
    flattened and packed (a call that ran out of time once returned nothing)."""
    import os
    import signal
    import sys
    import tarfile

    script = _script()
    out, archive = tmp_path / "out", tmp_path / "two_gpu.tgz"

    def parts_then_terminated(args, runner, parts, profiled):
        (runner.out / "report.json").write_text('{"runs": []}')
        (runner.out / "fsdp2").mkdir()
        (runner.out / "fsdp2" / "fsdp2.log").write_text("step: 1")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(script, "run_parts", parts_then_terminated)
    monkeypatch.setattr(sys, "argv", ["two_gpu_checks.py", "--parts", "same", "--flat",
                                      "--out", str(out), "--archive", str(archive)])
    previous = signal.getsignal(signal.SIGTERM)

    def no_handler_installed(*_):  # in place of the default action, which would end pytest itself
        raise AssertionError("two_gpu_checks.main installed no SIGTERM handler")

    signal.signal(signal.SIGTERM, no_handler_installed)
    try:
        with pytest.raises(SystemExit, match="SIGTERM"):
            script.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["fsdp2.log", "report.json"]

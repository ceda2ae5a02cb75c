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


def test_runs_trains_exactly_the_listed_runs_each_compared_with_its_optimizers_one_gpu(tmp_path, monkeypatch):
    import json
    import sys

    from torchtitan.config import ConfigManager

    script = _script()
    trained = []

    def fake_train(self, name, ngpu, extra, dump=None, kill_at=None, batches=2):
        trained.append((name, ngpu, batches, extra))
        scale = {"one_gpu": 1.0, "one_gpu_normuon": 2.0}.get(name, 1.001)
        tps = {"one_gpu": 100.0, "fsdp2": 90.0, "fsdp2_noreshard": 95.0, "one_gpu_normuon": 80.0}
        return {"name": name, "ngpu": ngpu, "losses": {1: 5.0 * scale, 2: 4.0 * scale},
                "tps_per_gpu": tps.get(name, 76.0)}

    monkeypatch.setattr(script.Runner, "make_seed", lambda self: None)
    monkeypatch.setattr(script.Runner, "train", fake_train)
    monkeypatch.setattr(script, "plot", lambda runs, path: None)
    runs = "one_gpu,fsdp2,fsdp2_noreshard,one_gpu_normuon,fsdp2_noreshard_normuon"
    monkeypatch.setattr(sys, "argv", ["two_gpu_checks.py", "--steps", "2", "--runs", runs,
                                      "--out", str(tmp_path / "out")])
    script.main()
    assert [t[0] for t in trained] == runs.split(",")  # no other part, no no-accumulation run
    assert [t[1] for t in trained] == [1, 2, 2, 1, 2]
    report = {r["name"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["runs"]}
    assert report["fsdp2_noreshard"]["tps_per_gpu_vs_1gpu"] == pytest.approx(0.95)
    # NorMuon's 2-GPU run against NorMuon's 1-GPU run (its losses are 2x AdamW's here)
    assert report["fsdp2_noreshard_normuon"]["tps_per_gpu_vs_1gpu"] == pytest.approx(76 / 80)
    assert report["fsdp2_noreshard_normuon"]["max_rel_loss_vs_1gpu"] == pytest.approx(0.5, rel=1e-2)
    assert report["fsdp2"]["max_rel_loss_vs_1gpu"] == pytest.approx(0.001, rel=1e-6)
    # the overrides parse and keep the gathered parameters from forward to backward
    extra = trained[2][3]
    cfg = ConfigManager().parse_args(["--job.config_file", str(ROOT / "train_configs" / "fusion_1b.toml"), *extra])
    assert cfg.parallelism.fsdp_reshard_after_forward == "never" and cfg.checkpoint.load_only
    assert "--optimizer.name" in trained[4][3]


def test_runs_refuses_a_two_gpu_run_without_its_reference(tmp_path, monkeypatch):
    import sys

    script = _script()
    monkeypatch.setattr(script.Runner, "make_seed", lambda self: pytest.fail("trained before refusing"))
    for runs, error in (("one_gpu,fsdp2_normuon", "add one_gpu_normuon"),
                        ("one_gpu_no_accum", "add one_gpu"),
                        ("one_gpu,fsdp2,fsdp2", "fsdp2: listed twice"),
                        ("one_gpu,fsdp4", "unknown run")):
        monkeypatch.setattr(sys, "argv", ["two_gpu_checks.py", "--runs", runs, "--out", str(tmp_path / "out")])
        with pytest.raises(SystemExit, match=error):
            script.main()

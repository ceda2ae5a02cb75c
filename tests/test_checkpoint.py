"""Checkpoint guards (fusion_titan/checkpoint/manager.py) and what a trainer checkpoint holds.

Fast tests work on copies of folders written by one real (async) trainer run; the slow ones run
the trainer again: exact resume past a model-only export and an interrupted save, and the clear
error for a checkpoint written with another optimizer.
"""

import os
import queue
import shutil
from pathlib import Path

import pytest

from fusion_titan.checkpoint.convert import load_dcp
from fusion_titan.checkpoint.folders import (
    FULL,
    INCOMPLETE,
    MODEL_ONLY,
    CorruptCheckpointError,
    step_folders,
    verify_files,
)
from fusion_titan.checkpoint.manager import FusionCheckpointManager, resume_step, stale_full_checkpoints
from trainer_runs import SEEDED, run_train, tb_losses  # async_run: tests/conftest.py

pytestmark = pytest.mark.slow  # every test here needs the trainer-written checkpoints


def ckpt(dump, step):
    return dump / "checkpoint" / f"step-{step}"


def interrupted_copy(src, dst):
    """What kill -9 during a save leaves: shards (one cut short) but no .metadata."""
    shutil.copytree(src, dst)
    os.remove(dst / ".metadata")
    shard = next(dst.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)


def test_async_run_writes_full_checkpoints_and_a_model_only_export(async_run):
    dump, log = async_run
    kinds = {f.step: f.kind for f in step_folders(str(dump / "checkpoint"))}
    assert kinds == {2: FULL, 4: FULL, 6: FULL, 8: MODEL_ONLY}, kinds
    assert sorted(tb_losses(dump)) == list(range(1, 9))


def test_checkpoint_content(async_run):
    dump, _ = async_run
    state = load_dcp(str(ckpt(dump, 6)), model_only=False)
    assert state["train_state"] == {"step": 6, "ntokens_seen": 6 * 2 * 64}
    assert state["lr_scheduler"]["last_epoch"] == 6
    assert set(state["dataloader"]) == {"packed_documents"}  # one position, the same on every rank
    opt = state["optimizer"]  # torchtitan flattens it: "state.<param>.<name>", "param_groups..."
    # NorMuon (hidden matrices, experts included): momentum and neuron-wise second moment
    for name in ("layers.0.mixer.wq_a.weight", "layers.0.moe.experts.w1", "layers.5.mixer.q_proj.weight",
                 "mtp.0.proj.weight"):
        for kind in ("momentum_buffer", "second_moment"):
            assert opt[f"state.{name}.{kind}"].abs().sum() > 0, (name, kind)
    # CautiousAdamW (embedding, router gates, vectors)
    for kind in ("exp_avg", "exp_avg_sq"):
        assert opt[f"state.tok_embeddings.weight.{kind}"].abs().sum() > 0
    # the MoE balancing biases are model state (persistent buffers) and have moved
    biases = [k for k in state if k.endswith("moe.expert_bias")]
    assert len(biases) == 5
    assert all(state[k].abs().sum() > 0 for k in biases)
    # the model-only export at the last step holds the model and nothing else
    export = load_dcp(str(ckpt(dump, 8)), model_only=False)
    assert set(export) == {k for k in state if k not in
                           ("train_state", "lr_scheduler", "dataloader", "optimizer")}


def test_resume_step_skips_exports_and_interrupted_saves(async_run, tmp_path, caplog):
    dump, _ = async_run
    folder = tmp_path / "checkpoint"
    for step in (4, 6, 8):
        shutil.copytree(ckpt(dump, step), folder / f"step-{step}")
    interrupted_copy(ckpt(dump, 6), folder / "step-10")
    with caplog.at_level("WARNING"):
        assert resume_step(str(folder)) == 6
    text = caplog.text
    assert str(folder / "step-8") in text and "model-only export" in text
    assert str(folder / "step-10") in text and "interrupted save" in text
    assert sorted(p.name for p in folder.iterdir()) == ["step-10", "step-4", "step-6", "step-8"]


def test_only_exports_refuse_to_resume(async_run, tmp_path):
    dump, _ = async_run
    folder = tmp_path / "checkpoint"
    shutil.copytree(ckpt(dump, 8), folder / "step-8")
    with pytest.raises(RuntimeError, match="no full checkpoint.*initial_load_path"):
        resume_step(str(folder))
    assert resume_step(str(tmp_path / "nothing")) == -1


def test_keep_latest_k_counts_only_full_checkpoints(async_run, tmp_path):
    dump, _ = async_run
    folder = tmp_path / "checkpoint"
    for step in (2, 4, 6, 8):
        shutil.copytree(ckpt(dump, step), folder / f"step-{step}")
    interrupted_copy(ckpt(dump, 6), folder / "step-12")
    assert stale_full_checkpoints(str(folder), 2) == [str(folder / "step-2")]
    # torchtitan's own rule would keep only step-8 (export) and step-12 (interrupted)
    manager = FusionCheckpointManager.__new__(FusionCheckpointManager)
    manager.keep_latest_k, manager.folder = 2, str(folder)
    manager.enable_ft_dataloader_checkpoints, manager.purge_queue = False, queue.Queue()
    manager._purge_stale_checkpoints()
    assert manager.purge_queue.get_nowait() == str(folder / "step-2") and manager.purge_queue.empty()


def test_truncated_shard_is_named(async_run, tmp_path):
    dump, _ = async_run
    bad = tmp_path / "step-6"
    shutil.copytree(ckpt(dump, 6), bad)
    shard = next(bad.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*truncated"):
        verify_files(str(bad))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_dcp(str(bad))
    (bad / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata cannot be read"):
        verify_files(str(bad))
    # newer than every good checkpoint: resume stops and names it (an older one is ignored)
    folder = tmp_path / "checkpoint"
    shutil.copytree(ckpt(dump, 4), folder / "step-4")
    shutil.copytree(bad, folder / "step-6")
    with pytest.raises(CorruptCheckpointError, match=f"{folder / 'step-6' / '.metadata'}"):
        resume_step(str(folder))
    shutil.move(folder / "step-6", folder / "step-2")
    assert resume_step(str(folder)) == 4
    assert shard.exists() and (folder / "step-2").exists()  # nothing deleted


def test_resume_is_exact_past_export_and_interrupted_save(async_run, tmp_path):
    """Resume from the async-written step-6 although step-8 (export) and step-7 (killed save) are
    newer; steps 7-8 must reproduce the uninterrupted run bit for bit; nothing is deleted."""
    dump, _ = async_run
    resumed = tmp_path / "resumed"
    for step in (4, 6, 8):
        shutil.copytree(ckpt(dump, step), ckpt(resumed, step))
    interrupted_copy(ckpt(dump, 6), ckpt(resumed, 7))
    log = run_train(resumed, "--training.steps", "8", "--checkpoint.interval", "2",
                    "--checkpoint.keep_latest_k", "2", "--checkpoint.last_save_model_only")
    assert "Training starts at step 7" in log, log[-3000:]
    assert "step-8: a model-only export" in log and "step-7: an interrupted save" in log
    reference, again = tb_losses(dump), tb_losses(resumed)
    assert sorted(again) == [7, 8]
    assert [again[s] for s in (7, 8)] == [reference[s] for s in (7, 8)]
    kinds = {f.step: f.kind for f in step_folders(str(resumed / "checkpoint"))}
    assert kinds == {4: FULL, 6: FULL, 7: INCOMPLETE, 8: MODEL_ONLY}


def test_checkpoint_of_another_optimizer_gives_a_clear_error(async_run, tmp_path):
    dump, _ = async_run
    other = tmp_path / "adamw"
    shutil.copytree(ckpt(dump, 6), ckpt(other, 6))
    log = run_train(other, "--training.steps", "8", "--optimizer.name", "AdamW", expect_ok=False)
    assert f"Loading checkpoint {ckpt(other, 6)} failed" in log, log[-4000:]
    assert "--checkpoint.exclude_from_loading optimizer,lr_scheduler" in log
    assert ckpt(other, 6).joinpath(".metadata").is_file()
    # the suggested fix works: weights, data position and step restored, optimizer restarted
    log = run_train(other, "--training.steps", "7", "--optimizer.name", "AdamW",
                    "--checkpoint.exclude_from_loading", "optimizer,lr_scheduler",
                    "--checkpoint.interval", "100")
    assert "Training starts at step 7" in log


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(async_run, tmp_path, monkeypatch):
    """A real kill -9 of the trainer while it writes step-4 (shards on disk, no .metadata yet):
    the next start resumes from step-2, keeps the dead folder, and reproduces the uninterrupted
    run's losses bit for bit."""
    dump, _ = async_run
    killed = tmp_path / "killed"
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FUSION_TEST_KILL_SAVE", "step-4")
    common = ("--training.steps", "8", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
              "--experimental.custom_import", "kill_during_save", *SEEDED)  # seeded like async_run
    log = run_train(killed, *common, expect_ok=False)
    assert "SIGKILL" in log or "Signals.SIGKILL" in log or "-9" in log, log[-3000:]
    assert (ckpt(killed, 2) / ".metadata").is_file()
    assert ckpt(killed, 4).is_dir() and not (ckpt(killed, 4) / ".metadata").exists()
    assert any(ckpt(killed, 4).glob("*.distcp"))  # the save really was under way

    monkeypatch.delenv("FUSION_TEST_KILL_SAVE")
    log = run_train(killed, *common)
    assert "Training starts at step 3" in log, log[-3000:]
    assert "step-4: an interrupted save" in log
    reference, again = tb_losses(dump), tb_losses(killed)
    assert [again[s] for s in range(3, 9)] == [reference[s] for s in range(3, 9)]

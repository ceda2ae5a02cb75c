"""The real torchtitan Trainer on debug_model.toml, through run_train.sh, on CPU.

One run of 30 steps checks that loss falls and DCP checkpoints are written; a second run resumes
from the step-20 checkpoint and must reproduce steps 21-30 bit for bit; a two-process run checks
FSDP2 over gloo. Minutes on a 2-core CPU: marked slow (CI runs them).
"""

import re
import shutil
from pathlib import Path

import pytest

from fusion_titan.training.tb_scalars import read_all_scalars
from trainer_runs import QUICK, SEEDED, launch, tb_losses

pytestmark = pytest.mark.slow


def run_train(dump: Path, *overrides: str, nproc: int = 1) -> str:
    """debug_model.toml as written (256-token rows), every checkpoint kept."""
    return launch(dump, "--checkpoint.keep_latest_k", "0", *overrides, nproc=nproc, timeout=1200)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("run30")
    log = run_train(dump, "--training.steps", "30", "--checkpoint.interval", "10")
    yield dump, log
    shutil.rmtree(dump, ignore_errors=True)  # ~1 GB of checkpoints: not kept past this module


def test_loss_falls_and_checkpoints_are_written(first_run):
    dump, log = first_run
    losses = tb_losses(dump)
    assert sorted(losses) == list(range(1, 31)), log[-3000:]
    early = sum(losses[s] for s in range(1, 6)) / 5
    late = sum(losses[s] for s in range(26, 31)) / 5
    assert late < early - 1.5, (early, late)
    for step in (10, 20, 30):
        assert (dump / "checkpoint" / f"step-{step}" / ".metadata").is_file()
    assert re.search(r"step: 30/30  loss:\s+[\d.]+  ce:\s+[\d.]+", log)  # the console line
    tb = read_all_scalars(dump)
    for tag in ("loss_metrics/ce", "loss_metrics/mtp_1", "loss_metrics/mtp_1_acc", "data/tokens_per_step",
                "moe/max_over_mean_load"):
        assert sorted(tb[tag]) == list(range(1, 31)), tag  # loss parts and stats go to TensorBoard


def test_resume_reproduces_the_uninterrupted_run(first_run, tmp_path):
    dump, _ = first_run
    reference = tb_losses(dump)
    resumed = tmp_path / "resumed"
    shutil.copytree(dump / "checkpoint" / "step-20", resumed / "checkpoint" / "step-20")
    log = run_train(resumed, "--training.steps", "30", "--checkpoint.interval", "10")
    assert "Training starts at step 21" in log
    again = tb_losses(resumed)
    assert sorted(again) == list(range(21, 31))
    assert [again[s] for s in range(21, 31)] == [reference[s] for s in range(21, 31)]


def test_two_process_fsdp(tmp_path):
    log = run_train(tmp_path, "--training.steps", "8", "--checkpoint.interval", "8", nproc=2)
    assert "Applied FSDP2 over 2 ranks" in log
    losses = tb_losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1]
    assert (tmp_path / "checkpoint" / "step-8" / ".metadata").is_file()


def test_two_process_expert_parallel(tmp_path):
    """FSDP2 x expert parallel 2 on gloo: torchtitan's all-to-all dispatch with our MoE and
    NorMuon on expert DTensors; checkpoint written."""
    run_train(tmp_path, "--training.steps", "4", "--checkpoint.interval", "4",
              "--parallelism.expert_parallel_degree", "2", nproc=2)
    losses = tb_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert (tmp_path / "checkpoint" / "step-4" / ".metadata").is_file()


def test_muon_trains_and_resumes_bit_exactly(tmp_path):
    """`--optimizer.name Muon` (Muon + AdamW): loss falls over 16 steps on 64-token rows, and a
    resume from the step-8 checkpoint (Muon momentum + AdamW moments) repeats steps 9-16 exactly."""
    muon = ("--optimizer.name", "Muon", "--training.steps", "16", "--checkpoint.interval", "8",
            *QUICK, *SEEDED)
    first = tmp_path / "first"
    log = run_train(first, *muon)
    losses = tb_losses(first)
    assert sorted(losses) == list(range(1, 17)), log[-3000:]
    early = sum(losses[s] for s in range(1, 4)) / 3
    late = sum(losses[s] for s in range(14, 17)) / 3
    assert late < early - 1.0, (early, late)

    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoint" / "step-8", resumed / "checkpoint" / "step-8")
    log = run_train(resumed, *muon)
    assert "Training starts at step 9" in log, log[-3000:]
    again = tb_losses(resumed)
    assert [again[s] for s in range(9, 17)] == [losses[s] for s in range(9, 17)]

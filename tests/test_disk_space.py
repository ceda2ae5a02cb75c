"""Room for checkpoints, checked at start-up (fusion_titan/checkpoint/disk_space.py)."""

import importlib.util
import os
from pathlib import Path

import pytest

from fusion_titan.checkpoint.disk_space import check_room, checkpoint_bytes, kept_at_once
from trainer_runs import run_train

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoints_on_disk_at_once():
    assert kept_at_once(keep_latest_k=2, steps=1000, interval=100) == 3  # 2 kept + the one written
    assert kept_at_once(keep_latest_k=2, steps=100, interval=100) == 1  # only one save in the run
    assert kept_at_once(keep_latest_k=0, steps=1000, interval=300) == 4  # all kept: 300, 600, 900, 1000


def test_room_levels(tmp_path):
    assert check_room(each=10, kept=3, folder=str(tmp_path / "ckpt"), free=30) is None
    level, message = check_room(each=10, kept=3, folder=str(tmp_path / "ckpt"), free=25)
    assert level == "warning" and "up to 3 are on disk at once" in message and "keep_latest_k" in message
    level, message = check_room(each=10e9, kept=3, folder=str(tmp_path / "a" / "b"), free=int(5e9))
    assert level == "error" and f"free under {tmp_path}" in message  # the nearest folder that exists
    assert "~10.00 GB" in message and "--checkpoint.no-enable" in message and "--job.dump_folder" in message


@pytest.mark.slow
def test_the_estimate_is_the_size_of_a_real_checkpoint(async_run):
    """The debug model with NorMuon + CautiousAdamW, as the trainer saved it at step 6 (async_run)."""
    # the optimizer options scripts/count_optimizer_ops.py builds (loaded by path: scripts/ on
    # sys.path would shadow packages such as lm_eval with the scripts of the same name)
    spec = importlib.util.spec_from_file_location("count_optimizer_ops", ROOT / "scripts" / "count_optimizer_ops.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    from fusion_titan.model.flavors import FLAVORS
    from fusion_titan.model.model import FusionModel
    from fusion_titan.training.optimizer import _optimizer_factory

    dump, _ = async_run
    real = sum(f.stat().st_size for f in (dump / "checkpoint" / "step-6").rglob("*") if f.is_file())
    estimate = checkpoint_bytes([_optimizer_factory(script._config("NorMuon"))(FusionModel(FLAVORS["debugmodel"]))])
    assert abs(estimate - real) / real < 0.05, (estimate, real)


@pytest.mark.slow
@pytest.mark.parametrize("free,fits", [(100_000_000, False), (400_000_000, True)], ids=["no-room", "tight"])
def test_the_trainer_stops_or_warns_before_training(tmp_path, monkeypatch, free, fits):
    """A disk with room for no checkpoint (the debug model's is ~0.26 GB): one message, exit 2,
    nothing trained or written. Room for 2 of the 3 on disk at once (keep_latest_k 2): a warning,
    and the run trains."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent) + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FUSION_TEST_FREE_BYTES", str(free))
    log = run_train(tmp_path, "--training.steps", "2", "--checkpoint.interval", "1",
                    "--experimental.custom_import", "small_disk", expect_ok=fits)
    if fits:
        assert "Checkpoints may fill the disk" in log and "up to 2 are on disk at once" in log
        assert (tmp_path / "checkpoint" / "step-2" / ".metadata").is_file()
    else:
        assert "No room for a checkpoint: a full checkpoint (weights + optimizer state) is ~0.26 GB" in log
        assert "exited with code" not in log and "Traceback" not in log, log[-3000:]
        assert "Training starts" not in log and not (tmp_path / "checkpoint").exists()

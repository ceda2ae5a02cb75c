"""The checks a run passes before torchtitan builds anything (fusion_titan/training/preflight.py)."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchtitan.config import ConfigManager

import fusion_titan.spec  # noqa: F401  registers "fusion"
from fusion_titan.training.preflight import ConfigError, model_args, preflight

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))
DEBUG = str(ROOT / "train_configs/debug_model.toml")


def parse(*args, config=DEBUG):
    return ConfigManager().parse_args(["--job.config_file", config, *args])


def full_checkpoint(folder: Path, step: int) -> None:
    """A DCP folder holding train_state: what the trainer's resume logic calls a full checkpoint."""
    state = {"train_state": {"step": torch.tensor(step)}, "model": {"w": torch.zeros(2)}}
    dcp.save(state, checkpoint_id=str(folder / f"step-{step}"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_validation_settings_fit_the_model(path):
    cfg = parse(config=str(path))
    assert cfg.validation.seq_len <= model_args(cfg).max_seq_len  # else eval.py and validation crash
    preflight(parse("--validation.enable", "--checkpoint.no-enable", config=str(path)))


def test_unknown_flavor_and_bad_override_are_one_message():
    with pytest.raises(ConfigError, match=r"unknown model flavor 'nope'.*debugmodel"):
        preflight(parse("--model.flavor", "nope"))
    with pytest.raises(ConfigError, match="layer_schedule"):
        preflight(parse("--model.layer_schedule", "5/1"))
    with pytest.raises(ConfigError, match="expert_parallel_degree 3 must divide n_routed_experts 8"):
        preflight(parse("--parallelism.expert_parallel_degree", "3"))


def test_validation_longer_than_the_rope_table_is_refused():
    with pytest.raises(ConfigError, match=r"--validation.seq_len 1024 or less"):
        preflight(parse("--validation.enable", "--validation.seq_len", "2048"))
    # training on longer rows grows the rope table (max(flavor, seq_len)): then it fits
    preflight(parse("--validation.enable", "--validation.seq_len", "2048", "--training.seq_len", "2048",
                    "--checkpoint.no-enable"))


def test_where_the_run_starts(tmp_path):
    dump = ["--job.dump_folder", str(tmp_path)]
    assert preflight(parse(*dump)).startswith(f"Starting a new run in {tmp_path} (checkpoints go to")
    assert "checkpointing off" in preflight(parse(*dump, "--checkpoint.no-enable"))
    full_checkpoint(tmp_path / "checkpoint", 4)
    full_checkpoint(tmp_path / "checkpoint", 6)
    line = preflight(parse(*dump, "--training.steps", "10"))
    assert line == (f"Resuming from checkpoint {tmp_path}/checkpoint/step-6: step 6 done, "
                    "training steps 7-10.")
    assert "step-4: step 4 done" in preflight(parse(*dump, "--training.steps", "10",
                                                    "--checkpoint.load_step", "4"))


def test_a_finished_run_stops_and_says_how_to_go_on(tmp_path):
    full_checkpoint(tmp_path / "checkpoint", 6)
    for steps in ("6", "5"):
        with pytest.raises(ConfigError) as error:
            preflight(parse("--job.dump_folder", str(tmp_path), "--training.steps", steps))
        message = str(error.value)
        assert message.startswith(f"Nothing to train: {tmp_path}/checkpoint/step-6 is at step 6")
        assert "--training.steps 12" in message and "--job.dump_folder" in message
        assert "--checkpoint.no-enable" in message
    # the ways out it names work
    preflight(parse("--job.dump_folder", str(tmp_path), "--training.steps", "6", "--checkpoint.no-enable"))
    preflight(parse("--job.dump_folder", str(tmp_path / "fresh"), "--training.steps", "6"))


def test_cudagraphs_with_gradient_accumulation_is_refused():
    """A CUDA graph replay would overwrite the earlier micro-batches' gradients."""
    with pytest.raises(ConfigError, match=r"cudagraphs = true cannot run with gradient accumulation \(2"):
        preflight(parse("--compile.cudagraphs", "--training.local_batch_size", "4",
                        "--training.global_batch_size", "8", "--checkpoint.no-enable"))
    # one micro-batch per step: allowed (the compile-time checks decide the rest)
    preflight(parse("--compile.cudagraphs", "--training.local_batch_size", "8",
                    "--training.global_batch_size", "8", "--checkpoint.no-enable"))

"""Every shipped TOML parses and builds its model on the meta device; bad input fails clearly."""

import dataclasses
from pathlib import Path

import pytest
import torch

from torchtitan.config import ConfigManager

import fusion_titan.spec  # noqa: F401  registers "fusion"
from fusion_titan.config import job_config as ours
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))


def parse(*args):
    return ConfigManager().parse_args(list(args))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds_on_meta(path):
    cfg = parse("--job.config_file", str(path))
    assert cfg.model.name == "fusion"
    args = FLAVORS[cfg.model.flavor]
    args.update_from_config(cfg)
    with torch.device("meta"):
        model = FusionModel(args)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_overrides_reach_the_model_args():
    cfg = parse("--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
                "--model.n_routed_experts", "0", "--model.mtp_depth", "0",
                "--model.logit_softcap", "0", "--model.mup", "False", "--model.layer_schedule", "ssm")
    args = FLAVORS[cfg.model.flavor]
    args.update_from_config(cfg)
    assert (args.n_routed_experts, args.mtp_depth, args.logit_softcap, args.mup, args.layer_schedule) == (
        0, 0, 0.0, False, "ssm")
    # the flavor table itself is untouched
    assert FLAVORS[cfg.model.flavor].n_routed_experts == 8


def test_wrong_toml_key_names_the_key(tmp_path):
    text = (ROOT / "train_configs/debug_model.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[model]\n", "[model]\nn_routed_expert = 4\n"))
    with pytest.raises(ValueError, match="n_routed_expert"):
        parse("--job.config_file", str(bad))


def test_wrong_cli_key_fails():
    with pytest.raises(SystemExit):
        parse("--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--training.stepz", "3")


def test_wrong_flavor_lists_the_valid_ones():
    with pytest.raises(KeyError, match="debugmodel"):
        FLAVORS["fusion_70b"]


def test_bad_schedule_and_expert_groups_are_explained():
    with pytest.raises(ValueError, match="layer_schedule"):
        FLAVORS["debugmodel"].replace(layer_schedule="5/1").validate()
    with pytest.raises(ValueError, match="n_expert_groups"):
        FLAVORS["debugmodel"].replace(n_routed_experts=6).validate()


def test_every_key_of_ours_is_documented():
    doc = (ROOT / "docs/config.md").read_text()
    for section in (ours.Model, ours.Optimizer, ours.Training, ours.LRScheduler, ours.Loss, ours.Data,
                    ours.Metrics):
        for f in dataclasses.fields(section):
            assert f"`{f.name}`" in doc, f"{section.__name__}.{f.name} is not in docs/config.md"


def test_wsd_schedule_boundaries():
    """1% warmup / 84% stable / 15% decay to min_lr_factor, from the TOML keys."""
    from fusion_titan.training.lr_schedule import build_lr_schedulers

    cfg = parse("--job.config_file", str(ROOT / "train_configs/debug_model.toml"),
                "--lr_scheduler.warmup_fraction", "0.02", "--lr_scheduler.decay_ratio", "0.15",
                "--lr_scheduler.min_lr_factor", "0.1", "--lr_scheduler.decay_type", "linear")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_lr_schedulers([opt], cfg.lr_scheduler, 200).schedulers[0]
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup: 4 steps (2% of 200) rising linearly to 1
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    # stable until the last 30 steps (15%), then linear decay towards 0.1
    assert all(lr == 1.0 for lr in lrs[3:171])
    assert lrs[171] < 1.0 and lrs[199] == pytest.approx(0.1 + 0.9 * (1 / 30), abs=1e-6)
    assert all(a >= b for a, b in zip(lrs[170:], lrs[171:]))

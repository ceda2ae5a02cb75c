"""The hybrid_95m flavor: its blocks, its size, and one short CPU run of its TOML.

It needs the `attn` mixer (model/mixers/attn.py); without it these tests skip."""

from __future__ import annotations

import pytest
import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from trainer_runs import launch, tb_losses

def meta_model(**changes):
    args = FLAVORS["hybrid_95m"].replace(**changes)
    args.validate()
    with torch.device("meta"):
        return FusionModel(args), args


def test_blocks_and_size():
    model, args = meta_model()
    blocks = list(model.layers.values())
    assert [b.kind for b in blocks] == ["gdn", "gdn", "csa", "attn"] * 4
    assert all(b.ffn_kind == "dense" for b in blocks) and len(model.mtp) == 0
    params = sum(p.numel() for p in model.parameters())
    # the seed's 95.7M is counted with a 32K vocabulary: the same model on 32,000 tokens
    small, _ = meta_model(vocab_size=32000)
    small_params = sum(p.numel() for p in small.parameters())
    assert abs(small_params - 95.7e6) / 95.7e6 < 0.01, small_params
    assert params - small_params == (152064 - 32000) * 576  # only the tied embedding differs


@pytest.mark.slow
def test_toml_trains_on_cpu(tmp_path):
    # the TOML's own optimizer (Muon + AdamW); 64-token rows keep it a smoke run
    dump = tmp_path / "run"
    launch(dump, "--training.seq_len", "64", "--training.local_batch_size", "2", "--training.steps", "6",
           "--lr_scheduler.warmup_steps", "1", "--checkpoint.no-enable",
           "--training.mixed_precision_param", "float32", config="train_configs/hybrid_95m.toml")
    losses = tb_losses(dump)
    assert sorted(losses) == list(range(1, 7))
    assert (losses[5] + losses[6]) / 2 < losses[1] - 0.5, losses

"""Hyper-connections + Engram memory + a layer pattern (+ the softmax top-k router), together,
through run_train.sh on CPU (two processes, so FSDP2 shards the streams' coefficients and the
n-gram tables). Slow."""

import pytest

from trainer_runs import SEEDED, run_train, tb_losses

pytestmark = pytest.mark.slow


# hc: today's MLA / GDN blocks; mhc: every new mixer kind, MoE blocks routed by softmax top-k
# with the Switch balance loss
PLAYGROUND = ["--model.layer_pattern", "attn,gdn,csa,mla,swa,linear", "--model.attn_window", "16",
              "--model.moe_router", "softmax_topk", "--model.moe_aux_loss", "switch"]


@pytest.mark.parametrize("mode, pattern", [
    ("hc", ["--model.layer_pattern", "mla,gdn,mla,gdn,mla,gdn"]), ("mhc", PLAYGROUND)])
def test_hyper_engram_layer_pattern_train_with_falling_loss(tmp_path, mode, pattern):
    steps = 20
    log = run_train(
        tmp_path, "--training.steps", str(steps), "--checkpoint.interval", str(steps), *SEEDED,
        *pattern,
        "--model.residual", "hyper", "--model.hyper_streams", "2", "--model.hyper_mode", mode,
        "--model.engram_layers", "0", "3", "--model.engram_table_size", "4096",
        "--model.engram_dim", "32", "--model.engram_heads", "2", "--optimizer.engram_lr", "1e-2",
        nproc=2,
    )
    assert "Applied FSDP2 over 2 ranks" in log
    losses = tb_losses(tmp_path)
    assert sorted(losses) == list(range(1, steps + 1)), log[-3000:]
    early = sum(losses[s] for s in range(1, 4)) / 3
    late = sum(losses[s] for s in range(steps - 2, steps + 1)) / 3
    assert late < early - 1.0, (early, late)
    assert (tmp_path / "checkpoint" / f"step-{steps}" / ".metadata").is_file()

"""The composite loss and its guards: weighting of the parts, and a non-finite part stops the step."""

import math
from types import SimpleNamespace

import pytest
import torch

from fusion_titan.training.loss import STEP_LOSSES, NonFiniteLossError, build_loss_fn, check_finite


def loss_fn(mtp_weight=0.3, z_weight=0.0):
    return build_loss_fn(SimpleNamespace(loss=SimpleNamespace(mtp_weight=mtp_weight, z_loss_weight=z_weight)))


def test_parts_are_weighted_and_recorded():
    STEP_LOSSES.finish_step()
    labels = torch.zeros(2, 4, dtype=torch.long)
    pred = {"ce_sum": torch.tensor(8.0), "z_sum": torch.tensor(2.0), "moe_aux_sum": torch.tensor(0.5),
            "mtp_sums": torch.tensor([6.0, 10.0]), "mtp_correct": torch.tensor([1, 2]),
            "mtp_tokens": torch.tensor([6, 4])}
    total = loss_fn(mtp_weight=0.3, z_weight=0.01)(pred, labels)
    assert total.item() == pytest.approx(8.0 + 0.01 * 2.0 + 0.5 + 0.3 / 2 * 16.0)
    parts = STEP_LOSSES.finish_step()
    assert parts["tokens"].item() == 8 and parts["mtp"].tolist() == [6.0, 10.0]


def test_logits_path_is_plain_cross_entropy():
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert loss_fn()(logits, labels).item() == pytest.approx(want.item())


def test_non_finite_part_is_named_with_the_step():
    with pytest.raises(NonFiniteLossError, match=r"step 7.*\['mtp'\]"):
        check_finite({"ce": torch.tensor(1.0), "mtp": torch.tensor([1.0, math.nan])}, 7)
    check_finite({"ce": torch.tensor(1.0)}, 7)  # finite: no error


def nan_pred():
    return {"ce_sum": torch.tensor(8.0), "mtp_sums": torch.tensor([6.0, math.nan]),
            "mtp_tokens": torch.tensor([6, 4])}


def test_a_non_finite_micro_batch_stops_before_its_backward():
    """The loss function itself refuses a non-finite part (right after the forward), so neither
    the backward nor the optimizer step runs; evaluation (no grad) is not refused."""
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(NonFiniteLossError, match=r"\['mtp'\]"):
        loss_fn()(nan_pred(), labels)
    with torch.no_grad():
        assert math.isnan(loss_fn()(nan_pred(), labels).item())
    STEP_LOSSES.finish_step()


def test_the_error_names_the_step_also_after_a_resume():
    """The step number comes from the optimizer: before its first step in this process from the
    (restored) state, then counted on the host (no device read per step). State restored at step
    41: a NaN in the first micro-batch is "at step 42"; after one more step, "at step 43"."""
    from fusion_titan.training.optimizer import build_optimizers

    model = torch.nn.Linear(4, 4)
    cfg = SimpleNamespace(name="AdamW", lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                          implementation="for-loop", early_step_in_backward=False)
    opt = build_optimizers([model], cfg, SimpleNamespace(get_optional_mesh=lambda name: None, ep=1))
    for inner in opt:  # what loading a checkpoint of step 41 leaves
        for p in model.parameters():
            inner.state[p] = {"step": torch.tensor(41.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    labels = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(NonFiniteLossError, match=r"at step 42 in \['mtp'\]"):
        loss_fn()(nan_pred(), labels)
    STEP_LOSSES.finish_step()
    loss_fn()({"ce_sum": model(torch.randn(2, 4)).square().sum()}, labels).backward()
    opt.step()
    assert all(int(inner.state[p]["step"]) == 42 for inner in opt for p in model.parameters())
    with pytest.raises(NonFiniteLossError, match=r"at step 43 in \['mtp'\]"):
        loss_fn()(nan_pred(), labels)
    STEP_LOSSES.finish_step()
    STEP_LOSSES.step_source = None


def test_fake_backend_runs_do_not_check_losses():
    """Under torchtitan's fake backend (scripts/fake_plan.py) collectives carry no data, so its
    losses are not the model's: a NaN there must not stop a memory / time measurement."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        total = loss_fn()(nan_pred(), torch.zeros(2, 4, dtype=torch.long))  # no NonFiniteLossError
        assert math.isnan(total.item())
    finally:
        dist.destroy_process_group()
        STEP_LOSSES.finish_step()

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


def test_optimizer_refuses_to_step_on_nan():
    from fusion_titan.training.optimizer import build_optimizers

    model = torch.nn.Linear(4, 4)
    cfg = SimpleNamespace(name="AdamW", lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                          implementation="for-loop", early_step_in_backward=False)
    dims = SimpleNamespace(get_optional_mesh=lambda name: None, ep=1)
    opt = build_optimizers([model], cfg, dims)
    before = model.weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    STEP_LOSSES.finish_step()
    STEP_LOSSES.add("ce", torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="ce"):
        opt.step()
    assert torch.equal(model.weight, before)


def test_fake_backend_runs_do_not_check_losses():
    """Under torchtitan's fake backend (scripts/fake_plan.py) collectives carry no data, so its
    losses are not the model's: a NaN there must not stop a memory / time measurement."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fusion_titan.training.optimizer import build_optimizers

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        model = torch.nn.Linear(4, 4)
        cfg = SimpleNamespace(name="AdamW", lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                              implementation="for-loop", early_step_in_backward=False)
        opt = build_optimizers([model], cfg, SimpleNamespace(get_optional_mesh=lambda name: None, ep=1))
        model(torch.randn(2, 4)).sum().backward()
        STEP_LOSSES.finish_step()
        STEP_LOSSES.add("ce", torch.tensor(float("nan")))
        opt.step()  # no NonFiniteLossError
        assert STEP_LOSSES.finish_step() == {}  # the step's parts were handed over all the same
    finally:
        dist.destroy_process_group()

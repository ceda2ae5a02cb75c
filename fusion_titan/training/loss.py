"""The composite training loss: CE (fused with softcap in the model) + weighted MTP + MoE terms.

The model returns loss *sums* (torchtitan divides by the global count of valid tokens), so this
function only weights and adds them, and records each part for the logs. Every part is kept
detached in `STEP_LOSSES` for the current optimizer step; the metrics processor reads the
previous step's parts.

A non-finite part stops training before its backward (so before any optimizer step): the check
reads the micro-batch's parts on the host right after its forward. That host sync waits for the
forward only; the backward and the optimizer step are launched while the GPU still runs the
backward. (Checking in the optimizer's pre-step hook, as before, made the host wait for the whole
backward, so every kernel launch of the optimizer step was exposed time: NorMuon launches ~1,600.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ..ops.softcap_cross_entropy import IGNORE_INDEX


@dataclass
class StepLosses:
    """Detached loss sums of one optimizer step, summed over its micro-batches (this rank)."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    finished: dict[str, torch.Tensor] = field(default_factory=dict)
    # () -> the optimizer step these parts belong to; set by the optimizer builder and called
    # only to name the step in an error (it may read the device)
    step_source: Callable[[], int | None] | None = None

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.parts[name] = self.parts[name] + value if name in self.parts else value

    def finish_step(self) -> dict[str, torch.Tensor]:
        """Called once per optimizer step: hand this step's parts over for logging, start afresh."""
        self.finished, self.parts = self.parts, {}
        return self.finished


STEP_LOSSES = StepLosses()


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(parts: dict[str, torch.Tensor], step: int | Callable[[], int | None] | None) -> None:
    """One device sync; names the offending part (and the step when known: a number, or a
    function giving it, called only on failure) so the cause is findable."""
    if not parts:
        return
    names = list(parts)
    finite = torch.isfinite(torch.stack([parts[n].reshape(-1).sum() for n in names])).tolist()
    bad = [n for n, ok in zip(names, finite) if not ok]
    if bad:
        step = step() if callable(step) else step
        where = f"at step {step} " if step is not None else ""
        raise NonFiniteLossError(
            f"non-finite loss {where}in {bad} (values: {[parts[n].tolist() for n in bad]}); the "
            "optimizer step was not taken. Lower the learning rate or resume from the last checkpoint."
        )


def _fake_collectives() -> bool:
    """Under torchtitan's fake backend collectives return no real data, so losses are not the
    model's (fake_plan.py measures memory and time only): a NaN there is not a training failure."""
    return dist.is_initialized() and dist.get_backend() == "fake"


def build_loss_fn(job_config, **kwargs):
    """TrainSpec.build_loss_fn: returns loss_fn(pred, labels) -> summed loss; raises
    NonFiniteLossError on a non-finite part, before the backward."""
    cfg = job_config.loss

    def loss_fn(pred, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):  # logits (validation / evaluation): plain CE sum
            return torch.nn.functional.cross_entropy(
                pred.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        total = pred["ce_sum"]
        losses = {"ce": pred["ce_sum"]}  # this micro-batch's loss parts
        STEP_LOSSES.add("tokens", (labels != IGNORE_INDEX).sum())
        if "z_sum" in pred:
            total = total + cfg.z_loss_weight * pred["z_sum"]
            losses["z"] = pred["z_sum"]
        if "moe_aux_sum" in pred:
            total = total + pred["moe_aux_sum"]
            losses["moe_aux"] = pred["moe_aux_sum"]
        if "mtp_sums" in pred:
            mtp = pred["mtp_sums"]
            # Averaged over depths and normalized by the trunk's token count (depth k has k fewer
            # positions per row: a <0.1% difference at seq 4096).
            total = total + cfg.mtp_weight / mtp.numel() * mtp.sum()
            losses["mtp"] = mtp
            STEP_LOSSES.add("mtp_tokens", pred["mtp_tokens"])
            if "mtp_correct" in pred:  # not given by the library head kernels
                STEP_LOSSES.add("mtp_correct", pred["mtp_correct"])
        for name, value in losses.items():
            STEP_LOSSES.add(name, value)
        if torch.is_grad_enabled() and not _fake_collectives():
            check_finite(losses, STEP_LOSSES.step_source)
        return total

    return loss_fn

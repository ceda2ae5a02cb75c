"""Held-out validation during training (`[validation]` in the TOML), as TrainSpec.build_validator_fn.

torchtitan 0.2.2's Validator builds a Hugging Face text dataloader in its constructor and
averages `loss_fn(model(...))` per batch; neither fits here. This subclass keeps torchtitan's
keys and hooks (`[validation] enable / freq / steps / local_batch_size / seq_len`,
should_validate, the train context and AMP, metrics_processor.log_validation) but:
  - takes its batches from our data pipeline's held-out split
    (fusion_titan.data.dataloader.build_validation_dataloader: finite, and every pass over it
    yields the same batches, so validations at different steps score the same tokens);
  - scores with the model's fused CE sum (forward with labels; MTP / balance terms are training
    losses and are not counted, and the training loss_fn is not called, so nothing leaks into
    the training step's logged loss parts);
  - reports the exact token-weighted mean CE over all batches and ranks, and its perplexity.
"""

from __future__ import annotations

import math

import torch

from torchtitan.components.validate import Validator
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from ..data.dataloader import build_validation_dataloader
from ..inference.perplexity import ce_sum_and_tokens


def validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config):
    """The held-out batches ((input_dict, labels) pairs): finite, the same ones on every pass."""
    return build_validation_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=False)


class FusionValidator(Validator):
    def __init__(self, job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                 validation_context, maybe_enable_amp, metrics_processor, pp_schedule=None,
                 pp_has_first_stage=None, pp_has_last_stage=None):
        # Not Validator.__init__: it would build torchtitan's HF validation dataloader.
        if parallel_dims.pp_enabled or parallel_dims.cp_enabled:
            raise ValueError("validation supports data / expert parallelism only (no PP or CP)")
        self.job_config = job_config
        self.dp_world_size, self.dp_rank = dp_world_size, dp_rank
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = None
        self.pp_has_first_stage = self.pp_has_last_stage = None
        # Built up front so a bad data config fails at start-up, not at the first validation.
        self.validation_dataloader = validation_dataloader(dp_world_size, dp_rank, tokenizer, job_config)

    @torch.no_grad()
    def validate(self, model_parts, step: int) -> None:
        assert len(model_parts) == 1, "no pipeline parallelism here"
        model = model_parts[0]
        model.eval()
        device = utils.device_type
        max_steps = self.job_config.validation.steps
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, tokens
        n = 0
        for input_dict, labels in self.validation_dataloader:
            if max_steps != -1 and n >= max_steps:
                break
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            with self.validation_context(), self.maybe_enable_amp:
                ce, tokens = ce_sum_and_tokens(model, input_dict["input"].to(device), labels.to(device))
            totals += torch.stack([ce.double(), tokens.double()])
            n += 1
        if n == 0:
            logger.warning("validation: the held-out loader produced no batch")
        mesh = self.parallel_dims.get_optional_mesh("loss")
        if mesh is not None:
            torch.distributed.all_reduce(totals, group=mesh.get_group())
        ce_sum, tokens = totals.tolist()
        mean_ce = ce_sum / tokens if tokens else float("nan")
        ppl = math.exp(mean_ce) if mean_ce < 700 else float("inf")
        self.metrics_processor.log_validation(
            loss=mean_ce, step=step,
            extra_metrics={"validation_metrics/perplexity": ppl, "validation_metrics/tokens": tokens})
        logger.info(f"validate step: {step:2}  ce: {mean_ce:.4f}  perplexity: {ppl:.2f}  "
                    f"tokens: {int(tokens)}  batches: {n}")
        model.train()


def build_validator(job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                    validation_context, maybe_enable_amp, metrics_processor=None, pp_schedule=None,
                    pp_has_first_stage=None, pp_has_last_stage=None) -> FusionValidator:
    """TrainSpec.build_validator_fn (torchtitan calls it when [validation] enable = true)."""
    assert metrics_processor is not None
    return FusionValidator(job_config, dp_world_size, dp_rank, tokenizer, parallel_dims, loss_fn,
                           validation_context, maybe_enable_amp, metrics_processor)

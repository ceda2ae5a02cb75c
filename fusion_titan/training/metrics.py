"""torchtitan's metrics processor with one readable console line per logged step.

Console, at every `[metrics] log_freq` step, one line:

    step:  5/60  loss: 11.23451  ce: 10.98760  lr: 3.00e-03  grad_norm:  2.7759
    memory:  1.39GiB(5.91%)  tps: 1,234  mfu: n/a  eta: 4m05s

`loss` is what is minimized (CE + mtp_weight x MTP + balance / z terms), `ce` the next-token
cross-entropy alone; `tps` tokens per second per device; `mfu` model FLOPs utilization ("n/a" on
a CPU: no peak to divide by); `eta` = steps left x the median of the recent steps' wall time.

TensorBoard / W&B get torchtitan's metrics plus: the loss split into CE / per-depth MTP (+ MTP
top-1 accuracy) / balance / z-loss, tokens per step, the learning rate of every parameter group,
and expert-load statistics of the last optimizer step. These extras also go to the console every
`[metrics] console_extras_freq` steps (0 = TensorBoard only). Validation results are printed by
the validator (fusion_titan/training/validate.py) and logged here to TensorBoard only.
"""

from __future__ import annotations

import collections
import math
import statistics
import time

import torch

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from .loss import STEP_LOSSES

RECENT_STEPS = 20  # steps whose median wall time predicts the rest (ETA)


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 245 -> '4m05s', 7.2 -> '7s'."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class FusionMetricsProcessor(MetricsProcessor):
    def __init__(self, job_config, parallel_dims, tag=None):
        super().__init__(job_config, parallel_dims, tag)
        # (step, time) when each optimizer step ended; torchtitan asks should_log once per step
        self._step_ends: collections.deque = collections.deque(maxlen=RECENT_STEPS + 1)
        self._step_ends.append((None, time.perf_counter()))
        self._step_lrs: dict[str, float] = {}
        self._next_lrs: dict[str, float] | None = None

    def should_log(self, step: int) -> bool:
        self._step_ends.append((step, time.perf_counter()))
        # The scheduler has stepped: the groups hold the next step's lr. This step's are the
        # ones seen one call earlier (the first step of a process: the next ones, for lack of them).
        current = self._learning_rates()
        self._step_lrs, self._next_lrs = self._next_lrs or current, current
        return super().should_log(step)

    def seconds_per_step(self) -> float:
        """Median wall time of the recent steps (checkpoint saves and validations included)."""
        times = [t for _, t in self._step_ends]
        return statistics.median(b - a for a, b in zip(times, times[1:]))

    def _loss_parts(self) -> dict[str, float]:
        parts = dict(STEP_LOSSES.finished)
        if not parts:
            return {}
        names = sorted(parts)
        flat = torch.cat([parts[n].reshape(-1).float() for n in names])
        mesh = self.parallel_dims.get_optional_mesh("loss")
        if mesh is not None:
            torch.distributed.all_reduce(flat, group=mesh.get_group())
        sizes = [parts[n].numel() for n in names]
        summed = dict(zip(names, flat.split(sizes)))
        tokens = summed["tokens"].item()
        out = {"loss_metrics/ce": summed["ce"].item() / tokens, "data/tokens_per_step": tokens}
        if "moe_aux" in summed:
            out["loss_metrics/moe_balance"] = summed["moe_aux"].item() / tokens
        if "z" in summed:
            out["loss_metrics/z_loss"] = summed["z"].item() / tokens
        if "mtp" in summed:
            n_k = summed["mtp_tokens"].clamp_min(1)
            for k, loss_k in enumerate((summed["mtp"] / n_k).tolist(), start=1):
                out[f"loss_metrics/mtp_{k}"] = loss_k
            if "mtp_correct" in summed:
                for k, acc_k in enumerate((summed["mtp_correct"] / n_k).tolist(), start=1):
                    out[f"loss_metrics/mtp_{k}_acc"] = acc_k
        return out

    def _learning_rates(self) -> dict[str, float]:
        out = {}
        optimizers = getattr(self, "optimizers", None)
        if optimizers is None:
            return out
        groups = [g for opt in optimizers for g in opt.param_groups]  # the scheduled ones
        for i, group in enumerate(groups):
            out[f"lr/{group.get('name', f'group{i}')}"] = float(group["lr"])
        return out

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = dict(extra_metrics or {})
        extra.update(self._loss_parts())
        extra.update(self._step_lrs)
        updater = getattr(getattr(self, "optimizers", None), "expert_bias_updater", None)
        if updater is not None:
            extra.update(updater.metrics())

        # torchtitan's throughput and memory figures (MetricsProcessor.log), one console line
        time_delta = time.perf_counter() - self.time_last_log
        tps = self.ntokens_since_last_log / (time_delta * self.parallel_dims.non_data_parallel_size)
        tflops = self.num_flops_per_token * tps / 1e12
        mfu = 100 * self.num_flops_per_token * tps / self.gpu_peak_flops  # NaN on CPU
        mem = self.device_memory_monitor.get_peak_stats()
        metrics = {
            "loss_metrics/global_avg_loss": global_avg_loss,
            "loss_metrics/global_max_loss": global_max_loss,
            "grad_norm": grad_norm,
            "throughput(tps)": tps,
            "time_metrics/end_to_end(s)": self.seconds_per_step(),
            "time_metrics/data_loading(s)": statistics.mean(self.data_loading_times or [0.0]),
            "time_metrics/data_loading(%)": 100 * sum(self.data_loading_times) / time_delta,
            "memory/max_active(GiB)": mem.max_active_gib,
            "memory/max_active(%)": mem.max_active_pct,
            "memory/max_reserved(GiB)": mem.max_reserved_gib,
            "memory/max_reserved(%)": mem.max_reserved_pct,
            "memory/num_alloc_retries": mem.num_alloc_retries,
            "memory/num_ooms": mem.num_ooms,
            **({"tflops": tflops, "mfu(%)": mfu} if math.isfinite(mfu) else {}),
            **extra,
        }
        self.logger.log(metrics, step)

        c = self.color
        steps = self.job_config.training.steps
        ce = extra.get("loss_metrics/ce")
        throughput = (f"tps: {round(tps):,}  tflops: {tflops:,.2f}  mfu: {mfu:.2f}%"
                      if math.isfinite(mfu) else f"tps: {round(tps):,}  mfu: n/a")
        logger.info(
            f"{c.red}step: {step:2}/{steps}  {c.green}loss: {global_avg_loss:8.5f}  "
            + (f"ce: {ce:8.5f}  " if ce is not None else "")
            + (f"{c.yellow}lr: {extra['lr']:.2e}  " if "lr" in extra else "")
            + f"{c.orange}grad_norm: {grad_norm:7.4f}  "
            f"{c.turquoise}memory: {mem.max_reserved_gib:5.2f}GiB({mem.max_reserved_pct:.2f}%)  "
            f"{c.blue}{throughput}  "
            f"{c.cyan}eta: {format_duration((steps - step) * self.seconds_per_step())}{c.reset}"
        )
        every = self.job_config.metrics.console_extras_freq
        if every > 0 and step % every == 0:
            shown = {(k if k.startswith("lr/") else k.split("/")[-1]): v for k, v in extra.items()
                     if k.startswith(("loss_metrics/", "moe/", "data/", "lr/"))}
            logger.info(f"step: {step:2}  " + "  ".join(f"{k}: {v:.4g}" for k, v in shown.items()))

        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()

    def log_validation(self, loss, step, extra_metrics=None):
        """TensorBoard only: the validator prints its own line (ce, perplexity, tokens)."""
        time_delta = time.perf_counter() - self.time_last_log
        mem = self.device_memory_monitor.get_peak_stats()
        tps = self.ntokens_since_last_log / (time_delta * self.parallel_dims.non_data_parallel_size)
        self.logger.log({
            "validation_metrics/loss": loss,
            "validation_metrics/throughput(tps)": tps,
            "validation_metrics/memory/max_active(GiB)": mem.max_active_gib,
            "validation_metrics/memory/max_reserved(GiB)": mem.max_reserved_gib,
            **(extra_metrics or {}),
        }, step)
        self.ntokens_since_last_log = 0
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()


def build_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return FusionMetricsProcessor(job_config, parallel_dims, tag)

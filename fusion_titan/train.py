"""Entry point: `python -m fusion_titan.train --job.config_file train_configs/X.toml [--a.b value]`.

It is torchtitan's own Trainer and main(); we only make sure the CPU mode is in place before
torchtitan's trainer modules are imported (they copy the device type at import time), that the
"fusion" spec is registered, that checkpointing uses our guards (fusion_titan/checkpoint/
manager.py: resume only from full checkpoints, keep_latest_k never purges the last one, clear
load errors), and that the console reads well (fusion_titan/infra/log_patches.py). Before
torchtitan starts, the configuration is checked (fusion_titan/training/preflight.py): a bad
setting, or a run that has nothing left to train, stops with one message and exit code 2; so
does a disk without room for one checkpoint, once the model and optimizer are built.
"""

from fusion_titan.infra.torchtitan_version import require_supported_torchtitan

require_supported_torchtitan()  # before anything of torchtitan is imported or patched

from fusion_titan.infra import cpu_shim  # noqa: E402

ON_CPU = cpu_shim.install()

import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from fusion_titan.infra import log_patches  # noqa: E402

log_patches.install(cpu=ON_CPU)  # before torchtitan parses the config (its HF-assets warning)

import fusion_titan.spec  # noqa: E402  (registers the "fusion" TrainSpec)
from fusion_titan.checkpoint.disk_space import check_room, checkpoint_bytes, free_bytes, kept_at_once  # noqa: E402
from fusion_titan.checkpoint.manager import use_fusion_checkpointing  # noqa: E402
from fusion_titan.infra.torchrun import CONFIG_ERROR  # noqa: E402
from fusion_titan.model.flops import count_params  # noqa: E402
from fusion_titan.training.preflight import ConfigError, preflight  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.tools.logging import init_logger, logger  # noqa: E402
from torchtitan.train import Trainer, main  # noqa: E402


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


class FusionTrainer(Trainer):
    def __init__(self, job_config):
        log_patches.apply_log_level()  # torchtitan's main has just reset the logger to INFO
        super().__init__(job_config)
        # torchtitan's __init__ builds its CheckpointManager by name; our subclass only
        # overrides methods, so switching the instance's class is enough.
        use_fusion_checkpointing(self.checkpointer)
        self._check_checkpoint_room(job_config)
        if job_config.model.name == fusion_titan.spec.SPEC_NAME:
            counts = count_params(self.model_parts[0], self.model_args)
            flops = self.metrics_processor.num_flops_per_token
            logger.info(
                f"Model {job_config.model.flavor}: {_count(counts.total)} parameters, "
                f"{_count(counts.active)} active per token, {flops / 1e9:.2f} GFLOP per token "
                f"(training, seq {job_config.training.seq_len}); all arguments: FUSION_LOG_LEVEL=DEBUG"
            )

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        if getattr(self.job_config.compile, "cudagraphs", False):
            # CUDA graph trees reuse a graph's memory on its next replay: mark each step's start
            # (one micro-batch per step: preflight refuses cudagraphs with accumulation)
            torch.compiler.cudagraph_mark_step_begin()
        return super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)

    def _check_checkpoint_room(self, job_config) -> None:
        """Stop (exit 2, every rank) when not one checkpoint fits on the disk; warn when the
        checkpoints kept at once may not (fusion_titan/checkpoint/disk_space.py)."""
        ckpt = job_config.checkpoint
        if not ckpt.enable:
            return
        optimizers = getattr(self.optimizers, "optimizers", [self.optimizers])
        each = checkpoint_bytes(optimizers)
        kept = kept_at_once(ckpt.keep_latest_k, job_config.training.steps, ckpt.interval)
        folder = os.path.join(job_config.job.dump_folder, ckpt.folder)
        # the least free space of any rank, so that all ranks stop or go on together
        free = torch.tensor([free_bytes(folder)], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
        problem = check_room(each, kept, folder, free=int(free.item()))
        if problem is None:
            return
        level, message = problem
        if level == "warning":
            logger.warning(message)
            return
        logger.error(message)
        sys.exit(CONFIG_ERROR)


def check_config() -> None:
    """Parse the command line as torchtitan will and run the preflight checks; exit 2 on an error."""
    init_logger()
    sys.argv[0] = "python -m fusion_titan.train"  # tyro's "For full helptext, run ... --help"
    config = ConfigManager().parse_args()  # unknown keys: tyro's message and exit code 2
    try:
        logger.info(preflight(config))
    except ConfigError as error:
        logger.error(str(error))
        sys.exit(2)


if __name__ == "__main__":
    check_config()
    main(FusionTrainer)

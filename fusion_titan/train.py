"""Entry point: `python -m fusion_titan.train --job.config_file train_configs/X.toml [--a.b value]`.

It is torchtitan's own Trainer and main(); we only make sure the CPU mode is in place before
torchtitan's trainer modules are imported (they copy the device type at import time), that the
"fusion" spec is registered, and that checkpointing uses our guards (fusion_titan/checkpoint/
manager.py: resume only from full checkpoints, keep_latest_k never purges the last one, clear
load errors).
"""

from fusion_titan.infra import cpu_shim
from fusion_titan.infra.torchtitan_version import require_supported_torchtitan

require_supported_torchtitan()  # before anything of torchtitan is imported or patched
cpu_shim.install()

import os  # noqa: E402

import fusion_titan.spec  # noqa: E402  (registers the "fusion" TrainSpec)
from fusion_titan.infra.plan_check import check_parallel_plan  # noqa: E402
from fusion_titan.checkpoint.manager import use_fusion_checkpointing  # noqa: E402
from torchtitan.train import Trainer, main  # noqa: E402


def _check_plan(job_config) -> None:
    if job_config.model.name != fusion_titan.spec.SPEC_NAME:
        return
    args = fusion_titan.spec.FLAVORS[job_config.model.flavor]
    experts = job_config.model.n_routed_experts
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("NGPU", "1")))
    if job_config.comm.mode in ("fake_backend", "local_tensor"):
        world = int(os.environ.get("NGPU", "1"))  # one process plays rank 0 of NGPU ranks
    check_parallel_plan(job_config.parallelism, world,
                        args.n_routed_experts if experts is None else experts)


class FusionTrainer(Trainer):
    def __init__(self, job_config):
        _check_plan(job_config)  # a plan that cannot shard stops here, naming the key to change
        super().__init__(job_config)
        # torchtitan's __init__ builds its CheckpointManager by name; our subclass only
        # overrides methods, so switching the instance's class is enough.
        use_fusion_checkpointing(self.checkpointer)


if __name__ == "__main__":
    main(FusionTrainer)

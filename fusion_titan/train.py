"""Entry point: `python -m fusion_titan.train --job.config_file train_configs/X.toml [--a.b value]`.

It is torchtitan's own Trainer and main(); we only make sure the CPU mode is in place before
torchtitan's trainer modules are imported (they copy the device type at import time), that the
"fusion" spec is registered, and that checkpointing uses our guards (fusion_titan/checkpoint/
manager.py: resume only from full checkpoints, keep_latest_k never purges the last one, clear
load errors).
"""

from fusion_titan.infra import cpu_shim

cpu_shim.install()

import fusion_titan.spec  # noqa: E402,F401  (registers the "fusion" TrainSpec)
from fusion_titan.checkpoint.manager import use_fusion_checkpointing  # noqa: E402
from torchtitan.train import Trainer, main  # noqa: E402


class FusionTrainer(Trainer):
    def __init__(self, job_config):
        super().__init__(job_config)
        # torchtitan's __init__ builds its CheckpointManager by name; our subclass only
        # overrides methods, so switching the instance's class is enough.
        use_fusion_checkpointing(self.checkpointer)


if __name__ == "__main__":
    main(FusionTrainer)

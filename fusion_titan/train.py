"""Entry point: `python -m fusion_titan.train --job.config_file train_configs/X.toml [--a.b value]`.

It is torchtitan's own Trainer and main(); we only make sure the CPU mode is in place before
torchtitan's trainer modules are imported (they copy the device type at import time) and that
the "fusion" spec is registered.
"""

from fusion_titan.infra import cpu_shim

cpu_shim.install()

import fusion_titan.spec  # noqa: E402,F401  (registers the "fusion" TrainSpec)
from torchtitan.train import Trainer, main  # noqa: E402

if __name__ == "__main__":
    main(Trainer)

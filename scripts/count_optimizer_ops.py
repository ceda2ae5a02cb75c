"""Count the ATen ops one NorMuon / Muon step dispatches, on CPU (host cost, not GPU time).

    python scripts/count_optimizer_ops.py [--layers 16] [--optimizer NorMuon]

The step is host-bound on the GPU when it launches many small kernels, so its op count is what
to keep low. The model is the debug flavor with fusion_1b's depth by default: the same blocks
and so the same list of matrix parameters (expert stacks one 3-D parameter each) as fusion_1b,
at widths a CPU steps in seconds. Counts are top-level ops (fusion_titan/bench/host_ops.py) of
the third step (state exists).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from fusion_titan.bench.host_ops import top_level_aten_ops
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.training.optimizer import _optimizer_factory


def _config(name: str) -> SimpleNamespace:
    """Optimizer options; their values do not change the counts (weight decay is on)."""
    from torchtitan.config.job_config import Optimizer as TorchtitanOptimizer

    return SimpleNamespace(name=name, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                           implementation=TorchtitanOptimizer.implementation, muon_lr=0.02,
                           muon_momentum=0.95, muon_beta2=0.95, muon_weight_decay=0.01,
                           ns_steps=5, muon_update_scale="adamw", muon_bucket_mb=512.0)


def count(layers: int, name: str) -> tuple[int, int, int]:
    """(matrix parameters, matrices, top-level ATen ops of one step) of the matrix rule."""
    torch.manual_seed(0)
    model = FusionModel(FLAVORS["debugmodel"].replace(vocab_size=512, n_layers=layers))
    model.init_weights()
    hybrid = _optimizer_factory(_config(name))(model)
    rule = hybrid.rules[name.lower()]
    params = [p for g in rule.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        rule.step()
    ops = top_level_aten_ops(rule.step)
    matrices = sum(p.shape[0] if p.ndim == 3 else 1 for p in params)
    return len(params), matrices, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=FLAVORS["fusion_1b"].n_layers)
    parser.add_argument("--optimizer", choices=("NorMuon", "Muon"), default="NorMuon")
    opts = parser.parse_args()
    n_params, matrices, ops = count(opts.layers, opts.optimizer)
    print(f"{opts.optimizer}, debug flavor at {opts.layers} layers: {n_params} matrix parameters "
          f"({matrices} matrices), {ops} top-level ATen ops per step")


if __name__ == "__main__":
    main()

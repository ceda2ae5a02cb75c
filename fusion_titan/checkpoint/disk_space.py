"""Room for the run's checkpoints, checked when the trainer starts.

A full disk otherwise ends a long run at a save: DCP's write fails mid-checkpoint (the earlier
checkpoints stay; the steps since the last one are lost). So at start-up the size of one full
checkpoint is estimated and compared with the space free under the checkpoint folder: no room
for even one stops the run with what to change; no room for all the checkpoints kept at once is
a warning.

Estimate: every parameter in its own dtype (fp32 master weights) plus its optimizer state, in
the same dtype: Adam-type rules two moments, momentum rules (NorMuon, Muon) one, their per-row
state is negligible. The whole model's: DCP writes every rank's shards into one folder.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

GB = 1e9


def state_tensors(optimizer: torch.optim.Optimizer) -> int:
    """Full-size state tensors per parameter: 2 for Adam-type rules, 1 for momentum rules."""
    return 2 if "adam" in type(optimizer).__name__.lower() else 1


def _rules(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that own parameters: a HybridOptimizer's rules, else itself."""
    return list(getattr(optimizer, "rules", {}).values()) or [optimizer]


def checkpoint_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of one full checkpoint of these optimizers' parameters (global sizes for DTensors)."""
    total = 0
    for opt in optimizers:
        for rule in _rules(opt):
            copies = 1 + state_tensors(rule)
            for group in rule.param_groups:
                total += sum(p.numel() * p.element_size() * copies for p in group["params"])
    return total


def kept_at_once(keep_latest_k: int, steps: int, interval: int) -> int:
    """Full checkpoints on disk at the worst moment: the kept ones plus the one being written
    (the oldest is deleted after a save ends); all of them when keep_latest_k is 0."""
    saves = max(1, math.ceil(steps / max(interval, 1)))
    return saves if keep_latest_k <= 0 else min(saves, keep_latest_k + 1)


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(folder: str) -> int:
    """Free bytes on the disk that holds `folder` (or would hold it: its nearest existing parent)."""
    return shutil.disk_usage(_existing(folder)).free


def check_room(each: int, kept: int, folder: str, free: int) -> tuple[str, str] | None:
    """(level, message) when `kept` checkpoints of `each` bytes may not fit in `free` bytes (the
    least free under `folder` on any rank): "error" when not even one fits, "warning" when all of
    them may not; None when they fit."""
    where = _existing(folder)
    if each <= free and each * kept <= free:
        return None
    sizes = (f"a full checkpoint (weights + optimizer state) is ~{each / GB:.2f} GB and "
             f"{free / GB:.2f} GB are free under {where}")
    if each > free:
        return "error", (f"No room for a checkpoint: {sizes}. Free some space, give "
                         "--job.dump_folder on a larger disk, or --checkpoint.no-enable (nothing saved).")
    return "warning", (f"Checkpoints may fill the disk: {sizes}, and up to {kept} are on disk at once "
                       f"(~{each * kept / GB:.2f} GB). Lower --checkpoint.keep_latest_k, raise "
                       "--checkpoint.interval, or free some space.")

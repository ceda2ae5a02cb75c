"""torchtitan's CheckpointManager with three guards it lacks (0.2.2).

1. Auto-resume picks the newest *full* checkpoint. torchtitan takes the highest `step-N` folder
   that has `.metadata`, which may be a model-only export (`last_save_model_only = true` at the
   last step) and then fails on the missing dataloader state. Folders skipped (model-only
   exports, interrupted saves without `.metadata`) are named in a warning; a checkpoint folder
   holding only exports is refused with the commands that do what the user likely wants.
2. keep_latest_k counts and deletes only full checkpoints. torchtitan counts every `step-N`
   folder, so a final model-only export or an interrupted save could push the last resumable
   checkpoint out. Exports, interrupted and corrupt folders are never deleted.
3. Loading fails with a message naming the folder and the fix: a truncated or missing shard
   (checked from the metadata before DCP reads anything), a checkpoint written with another
   optimizer (e.g. AdamW state in a NorMuon run), a model-only export given as a resume point,
   or another model configuration.

The Trainer builds torchtitan's class directly; `fusion_titan.train.FusionTrainer` switches the
instance to this subclass, which adds methods only (no state), right after construction.
"""

from __future__ import annotations

import os
import re

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.tools.logging import logger

from ..infra.torchtitan_version import require_supported_torchtitan
from .folders import (
    CORRUPT,
    FULL,
    HF_EXPORT,
    INCOMPLETE,
    METADATA,
    MODEL_ONLY,
    CorruptCheckpointError,
    is_full,
    read_metadata,
    step_folders,
    verify_files,
)

STATE_GROUPS = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def _fresh_run_hint(path: str) -> str:
    return (f"a fresh --job.dump_folder (or --checkpoint.folder) with "
            f"--checkpoint.initial_load_path {path} --checkpoint.initial_load_model_only")


def resume_step(folder: str, warn: bool = True) -> int:
    """The step auto-resume should load from `folder` (-1: start fresh); warns about skipped folders."""
    steps = step_folders(folder)
    # A step-0 model-only folder is torchtitan's seed checkpoint: loading it model-only is intended.
    usable = [f for f in steps if f.kind == FULL or (f.step == 0 and f.kind == MODEL_ONLY)]
    best = usable[-1].step if usable else -1
    for f in steps:
        if f.step > best and f.kind == CORRUPT:
            read_metadata(f.path)  # raises the error that names the file and the way out
        if f.step > best and warn:
            reason = {
                MODEL_ONLY: "a model-only export (no optimizer / dataloader / train state)",
                HF_EXPORT: "a Hugging Face safetensors export (model only)",
                INCOMPLETE: "an interrupted save (no .metadata)",
            }[f.kind]
            logger.warning(f"Checkpoint resume skips {f.path}: {reason}; it is left untouched.")
    if best == -1 and any(f.kind in (MODEL_ONLY, HF_EXPORT) for f in steps):
        exports = ", ".join(f.path for f in steps if f.kind in (MODEL_ONLY, HF_EXPORT))
        raise RuntimeError(
            f"The checkpoint folder {folder} holds model-only exports ({exports}) but no full "
            "checkpoint to resume from. To train on from those weights use "
            f"{_fresh_run_hint(exports.split(', ')[-1])}; to train from scratch use a fresh "
            "--job.dump_folder."
        )
    return best


def stale_full_checkpoints(folder: str, keep: int) -> list[str]:
    """The full checkpoints keep_latest_k = keep removes: all but the newest `keep` full ones.

    Only complete full checkpoints count and go; a save still in flight (async) has no
    .metadata yet, so `keep` complete ones always remain beside it. Model-only exports,
    interrupted saves and anything else are never removed.
    """
    full = [f.path for f in step_folders(folder) if f.kind == FULL]
    return full[:-keep] if keep > 0 else []


def explain_load_failure(path: str, error: Exception) -> str:
    """A message for a failed DCP load that says which state did not match and how to go on."""
    text = str(error)
    head = f"Loading checkpoint {path} failed"
    # the text may quote DCP's source line ("...: {fqn}.") before the real message: take the last
    found = re.findall(r"Missing key in checkpoint state_dict: ([\w.\-]+?)\.?(?=\s|$)", text)
    missing = found[-1] if found else None
    try:
        saved = set(read_metadata(path).state_dict_metadata)
        full = is_full(read_metadata(path))
    except Exception:  # noqa: BLE001 - best effort; the original error is chained anyway
        saved, full = set(), True
    if missing:
        key = missing
        group = key.split(".")[0] if key.split(".")[0] in STATE_GROUPS else "model"
        if not full and group != "model":
            return (f"{head}: it is a model-only export (no optimizer, lr_scheduler, dataloader "
                    f"or train state) and cannot resume a run. Start from its weights with "
                    f"{_fresh_run_hint(path)}.")
        if group == "optimizer":
            kinds = sorted({k.rsplit(".", 1)[-1] for k in saved if k.startswith("optimizer.state.")})
            return (f"{head}: its optimizer state does not match this run's optimizer (this run "
                    f"needs '{key}'; the checkpoint's optimizer state entries are {kinds}). It was "
                    "probably written with another [optimizer] name (e.g. AdamW vs NorMuon) or "
                    "another parameter grouping. To keep the weights, data "
                    "position and step and restart the optimizer and LR schedule: "
                    "--checkpoint.exclude_from_loading optimizer,lr_scheduler; or start a new "
                    f"run from the weights with {_fresh_run_hint(path)}.")
        if group == "model":
            return (f"{head}: model tensor '{key}' is not in the checkpoint, which was written by "
                    "another model configuration ([model] flavor or overrides); use the same "
                    "model settings as the run that wrote it.")
        return (f"{head}: its {group} state lacks '{key}' (written with another number of "
                f"data-parallel ranks or another setup?). To skip it: "
                f"--checkpoint.exclude_from_loading {group}.")
    if "Size mismatch" in text or "size mismatch" in text:
        return (f"{head}: tensor shapes differ from this run's model ({text.strip()[:500]}); the "
                "checkpoint was written by another model configuration ([model] flavor or overrides).")
    return f"{head} ({type(error).__name__}: {text.strip()[:1000]}). The checkpoint is left untouched."


class FusionCheckpointManager(CheckpointManager):
    def _find_load_step(self, folder: str = "") -> int:
        if folder:  # torchtft per-replica dataloader folders: torchtitan's own rule
            return super()._find_load_step(folder)
        return resume_step(self.folder)

    def dcp_load(self, state_dict, checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if not from_hf:
            if not os.path.isfile(os.path.join(checkpoint_id, METADATA)):
                raise FileNotFoundError(
                    f"{checkpoint_id} is not a complete DCP checkpoint (no {METADATA}); for a "
                    "Hugging Face folder add --checkpoint.initial_load_in_hf, or convert it with "
                    "scripts/convert_checkpoint.py hf-to-dcp."
                )
            verify_files(checkpoint_id)
        try:
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        except CorruptCheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise RuntimeError(explain_load_failure(checkpoint_id, e)) from e

    def dcp_save(self, state_dict, checkpoint_id: str, *args, **kwargs):
        # Saving into an existing folder (e.g. over a skipped model-only export) keeps its old
        # .metadata until DCP's final rename: drop it first so that a save killed half-way is
        # seen as interrupted, not as the older (now overwritten) checkpoint.
        stale = os.path.join(checkpoint_id, METADATA)
        if (not dist.is_initialized() or dist.get_rank() == 0) and os.path.isfile(stale):
            logger.warning(f"Overwriting the checkpoint in {checkpoint_id}.")
            os.remove(stale)
        return super().dcp_save(state_dict, checkpoint_id, *args, **kwargs)

    def _purge_stale_checkpoints(self) -> None:
        if self.keep_latest_k <= 0 or (dist.is_initialized() and dist.get_rank() != 0):
            return
        if self.enable_ft_dataloader_checkpoints and not (
            self.ft_manager and self.ft_manager.participating_rank() == 0
        ):
            return
        for path in stale_full_checkpoints(self.folder, self.keep_latest_k):
            self.purge_queue.put(path)


def use_fusion_checkpointing(manager: CheckpointManager) -> CheckpointManager:
    """Switch a constructed torchtitan CheckpointManager to FusionCheckpointManager (methods only)."""
    require_supported_torchtitan()  # the methods overridden are 0.2.2's private ones
    if type(manager) is CheckpointManager:
        manager.__class__ = FusionCheckpointManager
    return manager

"""What a `step-N` folder under the checkpoint folder holds, read from its files only.

DCP writes the shards first and `.metadata` last (through a temporary file and a rename), so a
folder without `.metadata` is a save that never finished (kill -9, node loss). A folder whose
metadata has no `train_state` is a model-only export (`last_save_model_only`, or a seed
checkpoint at step 0): it cannot resume a run, since optimizer, scheduler and data position are
missing. A folder with `model.safetensors.index.json` and no `.metadata` is a Hugging Face export.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from functools import lru_cache

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

METADATA = ".metadata"
HF_INDEX = "model.safetensors.index.json"
STEP_DIR = re.compile(r"step-(\d+)")

FULL = "full"  # resumable: model + optimizer + lr scheduler + dataloader + train state
MODEL_ONLY = "model_only"  # model weights only (final export or seed checkpoint)
HF_EXPORT = "hf_export"  # safetensors export (model only)
INCOMPLETE = "incomplete"  # no .metadata: an interrupted save
CORRUPT = "corrupt"  # .metadata present but unreadable (not what an interrupted save leaves)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that claims to be complete but whose files do not match its metadata."""


@dataclass(frozen=True)
class StepFolder:
    step: int
    path: str
    kind: str


def read_metadata(path: str) -> Metadata:
    """The DCP metadata of a checkpoint folder; a clear error naming the file if it is unreadable."""
    meta_file = os.path.join(path, METADATA)
    try:
        return _read_metadata_cached(path, os.stat(meta_file).st_mtime_ns)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint metadata {meta_file} cannot be read ({type(e).__name__}: {e}); the "
            "checkpoint is corrupt. Nothing was deleted: move the folder away (or pass "
            "--checkpoint.load_step with an older step) to resume from an earlier checkpoint."
        ) from e


@lru_cache(maxsize=64)
def _read_metadata_cached(path: str, mtime_ns: int) -> Metadata:
    # keyed by mtime: a folder re-saved in place is read again
    return FileSystemReader(path).read_metadata()


def is_full(metadata: Metadata) -> bool:
    return any(key.startswith("train_state") for key in metadata.state_dict_metadata)


def classify(path: str) -> str:
    if os.path.isfile(os.path.join(path, METADATA)):
        try:
            return FULL if is_full(read_metadata(path)) else MODEL_ONLY
        except CorruptCheckpointError:
            return CORRUPT
    if os.path.isfile(os.path.join(path, HF_INDEX)):
        return HF_EXPORT
    return INCOMPLETE


def step_folders(folder: str) -> list[StepFolder]:
    """Every `step-N` directory of `folder`, oldest first, with what it holds."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = STEP_DIR.fullmatch(name)
        path = os.path.join(folder, name)
        if match and os.path.isdir(path):
            found.append(StepFolder(int(match.group(1)), path, classify(path)))
    return sorted(found, key=lambda f: f.step)


def verify_files(path: str) -> None:
    """Every shard the metadata points to exists and is long enough (catches truncated files).

    Cheap: sizes only, no reading. DCP itself would fail later with an error that names neither
    the folder nor the file.
    """
    metadata = read_metadata(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CorruptCheckpointError(
                f"checkpoint file {file} is missing (its metadata refers to it); the checkpoint "
                f"{path} is incomplete or corrupt. Nothing was deleted."
            )
        size = os.path.getsize(file)
        if size < end:
            raise CorruptCheckpointError(
                f"checkpoint file {file} is truncated: {size} bytes, its metadata needs {end}; "
                f"the checkpoint {path} is corrupt. Nothing was deleted: move it away (or pass "
                "--checkpoint.load_step with an older step) to resume from an earlier checkpoint."
            )

"""Build a FusionModel from a training TOML (+ CLI-style overrides) and load trained weights.

Checkpoints accepted by `load_checkpoint`:
  - a DCP step folder written by run_train.sh (`<dump>/checkpoint/step-N`, a full training
    checkpoint or a model-only export): only the model's keys are read;
  - the checkpoint folder itself (`<dump>/checkpoint`) or the dump folder: the latest step-N;
  - a plain `torch.save` file of the model's state dict (optionally under a "model" key).

The model is the plain, unsharded module: no process group is needed (DCP's load runs in its
no-distributed mode and reshards whatever FSDP / expert-parallel layout the run saved).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..checkpoint.folders import (
    CORRUPT, FULL, METADATA, MODEL_ONLY, read_metadata, step_folders, verify_files,
)
from ..data.tokenizer import TiktokenTokenizer, build_tokenizer
from ..model.args import FusionModelArgs
from ..model.flavors import FLAVORS
from ..model.model import FusionModel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: FusionModel
    tokenizer: TiktokenTokenizer
    job_config: object  # torchtitan JobConfig (with our sections)
    checkpoint: Path | None


def load_job_config(config_file: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """The training run's JobConfig, parsed exactly as the trainer parses it (torchtitan's
    ConfigManager: TOML, then `--section.key value` overrides, our custom sections included)."""
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--job.config_file", str(config_file), *overrides])


def model_args_from_config(job_config) -> FusionModelArgs:
    if job_config.model.name != "fusion":
        raise ValueError(f"[model] name = {job_config.model.name!r}; this loader builds 'fusion'")
    args = FLAVORS[job_config.model.flavor]
    args.update_from_config(job_config)
    return args


def build_model(args: FusionModelArgs, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> FusionModel:
    """An initialized model in eval mode. Parameters get `dtype`; buffers (the rope table, the
    MoE selection bias) stay float32, as in training, so positions and routing keep full
    precision in a bf16 model."""
    device = torch.device(device)
    with torch.device("meta"):
        model = FusionModel(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    cast_parameters(model, dtype)
    return model.eval()


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def resolve_checkpoint(path: str | Path) -> Path:
    """A file, a DCP step folder, or the latest step-N under a checkpoint / dump folder."""
    path = Path(path).expanduser()
    if path.is_file() or (path / METADATA).is_file():
        return path
    for folder in (path, path / "checkpoint"):
        # full checkpoints and model-only exports hold the weights; a corrupt one is picked
        # too, so that loading it names the file (read_metadata's error)
        with_weights = [f for f in step_folders(str(folder)) if f.kind in (FULL, MODEL_ONLY, CORRUPT)]
        if with_weights:
            return Path(with_weights[-1].path)
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a torch.save file, a DCP folder with .metadata, or a "
        "folder holding step-N DCP folders (e.g. outputs/debug_model/checkpoint)"
    )


def _check_keys(path: Path, wanted, stored) -> None:
    missing = sorted(set(wanted) - set(stored))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KeyError(f"{path} lacks model keys {missing[:5]}{more}: the config / overrides do not "
                       "describe the model that was trained (compare [model] with the run's TOML)")


def load_checkpoint(model: FusionModel, path: str | Path) -> Path:
    """Load the model weights from `path` (see the module docstring) into `model`, in place.

    Every model key must be in the checkpoint (a missing one raises); other keys there
    (optimizer, dataloader, lr scheduler, train state) are not read.
    """
    path = resolve_checkpoint(path)
    state = model.state_dict()
    if path.is_file():
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
            loaded = loaded["model"]
        _check_keys(path, state, loaded)
        loaded = {k: loaded[k] for k in state}
    else:
        # DCP copies each stored tensor into the tensor we hand it (casting dtype, resharding
        # from whatever layout was saved); asking for the model keys only skips the rest.
        verify_files(str(path))  # a missing or truncated shard is named before DCP reads
        stored = read_metadata(str(path)).state_dict_metadata
        _check_keys(path, state, stored)
        loaded = {k: v.detach().clone() for k, v in state.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(loaded, checkpoint_id=str(path))
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in loaded.items()}, strict=True)
    return path


def load_model(config_file: str | Path, checkpoint: str | Path | None = None,
               overrides: list[str] | tuple[str, ...] = (), device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """TOML + overrides -> model (weights from `checkpoint`, or fresh init if None) + tokenizer."""
    job_config = load_job_config(config_file, overrides)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model = build_model(model_args_from_config(job_config), device=device, dtype=dtype)
    path = load_checkpoint(model, checkpoint) if checkpoint is not None else None
    return LoadedModel(model=model, tokenizer=build_tokenizer(job_config), job_config=job_config,
                       checkpoint=path)

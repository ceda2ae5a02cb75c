"""Offline conversions of trainer checkpoints (one process, no process group, CPU memory).

  DCP step folder -> one torch.save file (everything, or the model only)
  DCP step folder -> Hugging Face folder: safetensors shards, model.safetensors.index.json,
                     config.json (names and the interleaved rope layout of FusionStateDictAdapter),
                     the transformers remote code and the tokenizer (checkpoint/hf_export.py)
  HF folder       -> DCP folder holding the model only, which the trainer loads as initial
                     weights (--checkpoint.initial_load_path DIR --checkpoint.initial_load_model_only)

A trainer checkpoint stores model tensors under their own names at the top level, next to the
"optimizer", "lr_scheduler", "dataloader" and "train_state" entries; "the model" is the rest.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ..model.args import FusionModelArgs
from .folders import HF_INDEX, METADATA, read_metadata, verify_files
from .hf_export import make_readable, write_remote_code, write_tokenizer
from .manager import STATE_GROUPS
from .state_dict_adapter import (
    FusionStateDictAdapter, native_keys, read_config, read_rope_interleave, write_config,
)

DEFAULT_SHARD_BYTES = 5 * 1024**3  # the HF hub's usual shard size


def _check_dcp(path: str) -> None:
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise FileNotFoundError(f"{path} is not a complete DCP checkpoint (no {METADATA})")
    verify_files(path)


def model_keys(path: str) -> list[str]:
    return [k for k in read_metadata(path).state_dict_metadata
            if k.split(".")[0] not in STATE_GROUPS]


def load_dcp(path: str, model_only: bool = True) -> dict:
    """A DCP checkpoint as a plain (nested) dict of CPU tensors; only the model's by default."""
    _check_dcp(path)
    state: dict = {}
    keys = set(model_keys(path)) if model_only else None
    _load_state_dict(state, storage_reader=FileSystemReader(path),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return state


def dcp_to_torch(path: str, out_file: str, model_only: bool = False) -> dict:
    state = load_dcp(path, model_only=model_only)
    torch.save(state, out_file)
    return state


def _check_model_keys(state: dict, args: FusionModelArgs, path: str) -> None:
    expected, found = set(native_keys(args)), set(state)
    if expected != found:
        raise ValueError(
            f"{path} does not hold the model the given config describes: missing "
            f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]} (pass the "
            "TOML and overrides of the run that wrote it)"
        )


def dcp_to_hf(path: str, out_dir: str, args: FusionModelArgs, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              tokenizer: str | None = None) -> dict[str, torch.Tensor]:
    """Write the model of a DCP checkpoint as HF safetensors shards + index + config.json, the
    transformers remote code (configuration_fusion.py, modeling_fusion.py) and, given
    `tokenizer` (`[data] tokenizer`) and transformers installed, the tokenizer files; all 0644."""
    from safetensors.torch import save_file

    state = load_dcp(path, model_only=True)
    _check_model_keys(state, args, path)
    hf = FusionStateDictAdapter(args).to_hf(state)
    hf = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in hf.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    os.makedirs(out_dir, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    with open(os.path.join(out_dir, HF_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    stored = {t.dtype for t in hf.values() if t.is_floating_point()}
    write_config(args, out_dir, dtype=stored.pop() if len(stored) == 1 else None)
    write_remote_code(out_dir)
    if tokenizer is not None and write_tokenizer(out_dir, tokenizer) is None:
        print("tokenizer files not written: they need transformers (pip install -e '.[hf]')")
    make_readable(out_dir)
    return hf


def load_hf(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, HF_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {hf_dir}")
    state = {}
    for file in files:
        state.update(load_file(os.path.join(hf_dir, file)))
    return state


def hf_to_dcp(hf_dir: str, out_dir: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An HF folder written by dcp_to_hf (config.json + safetensors) -> a model-only DCP folder."""
    args = read_config(hf_dir)
    adapter = FusionStateDictAdapter(args, rope_interleave=read_rope_interleave(hf_dir))
    state = adapter.from_hf(load_hf(hf_dir))
    _check_model_keys(state, args, hf_dir)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    dcp.save(state, checkpoint_id=out_dir, no_dist=True)
    return state

"""Our model's state dict <-> Hugging Face style names (TrainSpec.state_dict_adapter).

Names follow DeepSeek-V3 for the parts it has (MLA, DeepSeekMoE, MTP) and Qwen3-Next's
`linear_attn` for Gated DeltaNet blocks:

  tok_embeddings.weight                 model.embed_tokens.weight   (tied: no lm_head.weight)
  norm.weight                           model.norm.weight
  layers.{i}.attention_norm / ffn_norm  model.layers.{i}.input_layernorm / post_attention_layernorm
  layers.{i}.mixer.wq_a, q_norm, wq_b   model.layers.{i}.self_attn.q_a_proj, q_a_layernorm, q_b_proj
  layers.{i}.mixer.wkv_a, kv_norm,      ...self_attn.kv_a_proj_with_mqa, kv_a_layernorm,
                   wkv_b, wo                          kv_b_proj, o_proj   (wq: q_proj)
  layers.{i}.mixer.* (GDN)              model.layers.{i}.linear_attn.*  (o_norm: norm,
                                        o_proj: out_proj, {q,k,v}_conv: {q,k,v}_conv1d)
  layers.{i}.mixer.* (Mamba-2)          model.layers.{i}.mamba.*
  layers.{i}.moe.router.gate.weight     model.layers.{i}.mlp.gate.weight
  layers.{i}.moe.expert_bias            model.layers.{i}.mlp.gate.e_score_correction_bias
  layers.{i}.moe.experts.w1 [E, h, d]   model.layers.{i}.mlp.experts.{e}.gate_proj.weight [h, d]
                     w2 / w3            ...down_proj / up_proj, one tensor per expert
  ...moe.shared_experts.w1/w2/w3        ...mlp.shared_experts.gate_proj/down_proj/up_proj
  ...feed_forward.w1/w2/w3              ...mlp.gate_proj/down_proj/up_proj
  mtp.{k}.hidden_norm, embed_norm,      model.mtp.{k}.hnorm, enorm, eh_proj, shared_head.norm,
         proj, norm, block.*            and the block's names directly under model.mtp.{k}

RoPE layout: our `apply_rope` rotates half-split pairs (x[i], x[i + rope/2]); DeepSeek-V3's
reference code, torchtitan's deepseek_v3 and transformers' DeepseekV3 (rope_interleave = true)
rotate interleaved pairs (x[2i], x[2i + 1]) with the same frequencies. The exported rope rows of
`q_b_proj` (or `q_proj`), per head, and of `kv_a_proj_with_mqa` are therefore permuted into the
interleaved order those names imply (`rope_interleave: true` in config.json), and permuted back
on import; nothing else is transposed or permuted. `config.json` carries every FusionModelArgs
field (under "fusion_model_args") plus the usual HF keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from ..model.args import FusionModelArgs
from .folders import HF_INDEX
from .hf_export import AUTO_MAP

CONFIG_FILE = "config.json"

_EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_MLA = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wq": "q_proj",
        "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
        "wo": "o_proj"}
_GDN = {"o_norm": "norm", "o_proj": "out_proj", "q_conv": "q_conv1d", "k_conv": "k_conv1d",
        "v_conv": "v_conv1d"}
_MTP = {"hidden_norm": "hnorm", "embed_norm": "enorm", "proj": "eh_proj", "norm": "shared_head.norm"}
_EXPERTS = re.compile(r"(layers\.\d+)\.moe\.experts\.(w[123])")


def _block_to_hf(rest: str, mixer: str) -> str:
    """Name inside one FusionBlock -> HF name inside one decoder layer."""
    head, _, tail = rest.partition(".")
    if head == "attention_norm":
        return f"input_layernorm.{tail}"
    if head == "ffn_norm":
        return f"post_attention_layernorm.{tail}"
    if head == "mixer":
        sub, _, leaf = tail.partition(".")
        if mixer == "mla":
            return f"self_attn.{_MLA.get(sub, sub)}" + (f".{leaf}" if leaf else "")
        if mixer == "gdn":
            return f"linear_attn.{_GDN.get(sub, sub)}" + (f".{leaf}" if leaf else "")
        return f"mamba.{tail}"
    if head == "feed_forward":
        w, _, leaf = tail.partition(".")
        return f"mlp.{_EXPERT_PROJ[w]}.{leaf}"
    if head == "moe":
        if tail == "expert_bias":
            return "mlp.gate.e_score_correction_bias"
        if tail.startswith("router.gate."):
            return "mlp.gate." + tail[len("router.gate."):]
        if tail.startswith("shared_experts."):
            w, _, leaf = tail[len("shared_experts."):].partition(".")
            return f"mlp.shared_experts.{_EXPERT_PROJ[w]}.{leaf}"
    raise KeyError(f"no Hugging Face name for block parameter {rest!r}")


def native_to_hf_name(key: str, args: FusionModelArgs) -> str:
    """HF name of one native (non-grouped-expert) key."""
    if key == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if key.startswith("norm."):
        return "model." + key
    parts = key.split(".")
    if parts[0] == "layers":
        kind = args.block_kinds()[int(parts[1])]
        return f"model.layers.{parts[1]}." + _block_to_hf(".".join(parts[2:]), kind)
    if parts[0] == "mtp":
        prefix, leaf = f"model.mtp.{parts[1]}.", ".".join(parts[3:])
        if parts[2] == "block":
            return prefix + _block_to_hf(leaf, "mla")
        return prefix + f"{_MTP.get(parts[2], parts[2])}.{leaf}"
    raise KeyError(f"no Hugging Face name for {key!r}")


def expert_hf_names(key: str, n_experts: int) -> list[str]:
    """Per-expert HF names of a grouped expert tensor `layers.{i}.moe.experts.w{1,2,3}`."""
    layer, w = _EXPERTS.fullmatch(key).groups()
    return [f"model.{layer}.mlp.experts.{e}.{_EXPERT_PROJ[w]}.weight" for e in range(n_experts)]


def interleave_order(rope_dim: int) -> torch.Tensor:
    """Index order taking a half-split rope vector to the interleaved layout:
    out[2i] = x[i], out[2i + 1] = x[rope_dim / 2 + i]."""
    half = rope_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()


def _rope_rows(key: str, args: FusionModelArgs) -> torch.Tensor | None:
    """Row indices holding rope features in an MLA weight (None: no rope rows)."""
    rope, kind = args.qk_rope_head_dim, key.rsplit(".", 2)[-2]
    if ".mixer." not in key or kind not in ("wq", "wq_b", "wkv_a"):
        return None
    if kind == "wkv_a":  # [kv_lora_rank + rope, dim]: one shared rope key
        return torch.arange(args.kv_lora_rank, args.kv_lora_rank + rope)
    head = args.qk_nope_head_dim + rope  # [n_heads * (nope + rope), in]: per head
    return (torch.arange(args.n_heads)[:, None] * head + args.qk_nope_head_dim
            + torch.arange(rope)).flatten()


def permute_rope_rows(key: str, value, args: FusionModelArgs, to_interleaved: bool):
    """`value` with its rope rows in the interleaved (to_interleaved) or our half-split order."""
    rows = _rope_rows(key, args)
    if rows is None:
        return value
    layout = (value.device_mesh, value.placements) if isinstance(value, DTensor) else None
    full = value.full_tensor() if layout else value
    order = interleave_order(args.qk_rope_head_dim)
    if not to_interleaved:
        order = torch.argsort(order)
    rows_in_order = rows.view(-1, args.qk_rope_head_dim)[:, order].flatten()
    out = full.clone()
    out[rows.to(full.device)] = full[rows_in_order.to(full.device)]
    return distribute_tensor(out, *layout) if layout else out


def native_keys(args: FusionModelArgs) -> list[str]:
    """The model's state dict keys for these args (built on the meta device: no memory)."""
    from ..model.model import FusionModel

    with torch.device("meta"):
        model = FusionModel(args.replace())
    return list(model.state_dict().keys())


# --------------------------------------------------------------------------------------------
# config.json


def check_hf_exportable(args: FusionModelArgs) -> None:
    """The HF remote code (checkpoint/hf_remote) knows the schedule presets' blocks only."""
    specs = args.layer_specs()
    unsupported = []
    odd = sorted({s.mixer for s in specs} - {"mla", "gdn", "mamba2"})
    if odd:
        unsupported.append(f"mixers {odd}")
    if any(s.ffn is not None for s in specs):
        unsupported.append("explicit block FFNs")
    if args.residual != "plain":
        unsupported.append(f"residual {args.residual!r}")
    if args.engram_layers:
        unsupported.append("Engram memory")
    if unsupported:
        raise ValueError(
            "Hugging Face export supports MLA / Gated DeltaNet / Mamba-2 blocks with their default "
            f"FFNs and the plain residual; this model has {', '.join(unsupported)}. Use the DCP "
            "checkpoint or one torch file (scripts/convert_checkpoint.py dcp-to-torch) instead.")


def write_config(args: FusionModelArgs, folder: str, dtype: torch.dtype | None = None) -> str:
    check_hf_exportable(args)
    kinds = args.block_kinds()
    config = {
        "architectures": ["FusionForCausalLM"],
        "model_type": "fusion_titan",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "vocab_size": args.vocab_size,
        "num_attention_heads": args.n_heads,
        "intermediate_size": args.ffn_hidden_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "n_routed_experts": args.n_routed_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_nextn_predict_layers": args.mtp_depth,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "layer_types": ["full_attention" if k == "mla" else "linear_attention" for k in kinds],
        "tie_word_embeddings": True,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "rope_theta": args.rope_theta,
        "rope_interleave": True,  # rope rows exported in DeepSeek-V3's interleaved order
        "auto_map": AUTO_MAP,  # transformers' trust_remote_code entry points (hf_export.py)
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        # the exact arguments our model is built from; read back by read_config
        "fusion_model_args": dataclasses.asdict(args),
    }
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def _load_config(folder: str) -> tuple[str, dict]:
    path = os.path.join(folder, CONFIG_FILE)
    with open(path) as f:
        return path, json.load(f)


def read_rope_interleave(folder: str) -> bool:
    """Whether the folder's rope rows are interleaved; exports written before the layout was
    recorded (no `rope_interleave` key) hold our half-split order."""
    return bool(_load_config(folder)[1].get("rope_interleave", False))


def read_config(folder: str) -> FusionModelArgs:
    path, config = _load_config(folder)
    if "fusion_model_args" not in config:
        raise ValueError(f"{path} was not written by fusion_titan (no 'fusion_model_args')")
    fields = {f.name for f in dataclasses.fields(FusionModelArgs)}
    unknown = set(config["fusion_model_args"]) - fields
    if unknown:
        raise ValueError(f"{path} has model arguments this version does not know: {sorted(unknown)}")
    return FusionModelArgs(**config["fusion_model_args"])


# --------------------------------------------------------------------------------------------
# the adapter


class FusionStateDictAdapter(StateDictAdapter):
    """rope_interleave: the HF side holds the rope rows in the interleaved order (what we export);
    False reads (and writes) our half-split order unchanged, for folders written before."""

    def __init__(self, model_args: FusionModelArgs, hf_assets_path: str | None = None,
                 rope_interleave: bool = True):
        # torchtitan's base reads a shard layout from hf_assets_path/model.safetensors.index.json
        # and warns on every run when the (tokenizer) folder has none: only look when it exists.
        has_index = bool(hf_assets_path) and os.path.isfile(os.path.join(hf_assets_path, HF_INDEX))
        super().__init__(model_args, hf_assets_path if has_index else None)
        self.hf_assets_path = hf_assets_path
        self.model_args = model_args
        self.rope_interleave = rope_interleave
        self.n_experts = model_args.n_routed_experts
        # hf name -> (native key, expert index or None), for every key of this configuration
        self._from_hf: dict[str, tuple[str, int | None]] = {}
        # DTensor layout of grouped expert tensors seen by to_hf, to rebuild them in from_hf
        self._expert_layout: dict[str, tuple[Any, Any]] = {}
        # torchtitan builds the adapter for every run: a model the HF side cannot hold trains,
        # and only a conversion says why
        self._unsupported: str | None = None
        try:
            check_hf_exportable(model_args)
        except ValueError as e:
            self._unsupported = str(e)
            return
        for key in native_keys(model_args):
            if _EXPERTS.fullmatch(key):
                names = [(n, e) for e, n in enumerate(expert_hf_names(key, self.n_experts))]
            else:
                names = [(native_to_hf_name(key, model_args), None)]
            for name, e in names:
                if name in self._from_hf:  # the mapping must be one-to-one to round-trip
                    raise AssertionError(f"{key} and {self._from_hf[name][0]} both map to {name}")
                self._from_hf[name] = (key, e)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._unsupported:
            raise ValueError(self._unsupported)
        out = {}
        for key, value in state_dict.items():
            if _EXPERTS.fullmatch(key):
                if isinstance(value, DTensor):
                    # experts may be sharded on dim 0 (EP) or 1 (FSDP): split the full tensor
                    self._expert_layout[key] = (value.device_mesh, value.placements)
                    value = value.full_tensor()
                for name, expert in zip(expert_hf_names(key, value.shape[0]), value.unbind(0)):
                    out[name] = expert
            else:
                if self.rope_interleave:
                    value = permute_rope_rows(key, value, self.model_args, to_interleaved=True)
                out[native_to_hf_name(key, self.model_args)] = value
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._unsupported:
            raise ValueError(self._unsupported)
        out: dict[str, Any] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for name, value in hf_state_dict.items():
            if name not in self._from_hf:
                raise KeyError(f"{name!r} is not a tensor of this model configuration")
            key, e = self._from_hf[name]
            if e is None:
                if self.rope_interleave:
                    value = permute_rope_rows(key, value, self.model_args, to_interleaved=False)
                out[key] = value
            else:
                experts.setdefault(key, {})[e] = value
        for key, parts in experts.items():
            missing = sorted(set(range(self.n_experts)) - set(parts))
            if missing:
                raise KeyError(f"{key}: experts {missing} are missing from the Hugging Face state dict")
            stacked = torch.stack([parts[e] for e in range(self.n_experts)])
            if key in self._expert_layout:
                mesh, placements = self._expert_layout[key]
                stacked = distribute_tensor(stacked, mesh, placements)
            out[key] = stacked
        return out

    def hf_names(self) -> list[str]:
        return list(self._from_hf)

"""scripts/convert_checkpoint.py and the state dict adapter.

Fast: HF names are one-to-one for every schedule (MLA+MoE, GDN, Mamba-2, MTP, dense), experts
split and stack back, config.json round-trips FusionModelArgs. Slow (a trainer-written
checkpoint): DCP -> HF -> DCP and DCP -> torch.save give the original tensors exactly, and the
trainer starts from the converted folder.
"""

import json
import subprocess
import sys

import pytest
import torch

from fusion_titan.checkpoint.convert import load_dcp, load_hf
from fusion_titan.checkpoint.state_dict_adapter import FusionStateDictAdapter, read_config, write_config
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from trainer_runs import ROOT, async_run, run_train, tb_losses  # noqa: F401  (async_run: fixture)

SCRIPT = str(ROOT / "scripts" / "convert_checkpoint.py")


def small_args(**changes):
    return FLAVORS["debugmodel"].replace(**{"vocab_size": 64, "n_layers": 4, "layer_schedule": "2:1",
                                            **changes})


@pytest.mark.parametrize("changes", [
    {}, {"ssm_type": "mamba2"}, {"n_routed_experts": 0, "mtp_depth": 0}, {"layer_schedule": "ssm"},
    {"mtp_depth": 2, "n_shared_experts": 0},
])
def test_adapter_round_trip(changes):
    args = small_args(**changes)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    state = {k: v + torch.randn_like(v) * 0.01 for k, v in model.state_dict().items()}
    adapter = FusionStateDictAdapter(args)
    hf = adapter.to_hf(state)
    assert len(set(hf)) == len(hf) == len(adapter.hf_names())
    assert all(k.startswith("model.") for k in hf)
    if "layers.0.moe.experts.w1" in state:
        w1 = state["layers.0.moe.experts.w1"]
        assert torch.equal(hf["model.layers.0.mlp.experts.3.gate_proj.weight"], w1[3])
        assert "model.layers.0.mlp.gate.e_score_correction_bias" in hf
    back = adapter.from_hf(hf)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    model.load_state_dict(back)  # strict: exactly the model's keys


def test_adapter_names_missing_experts():
    args = small_args()
    adapter = FusionStateDictAdapter(args)
    hf = adapter.to_hf({"layers.0.moe.experts.w2": torch.zeros(8, 128, 128)})
    del hf["model.layers.0.mlp.experts.5.down_proj.weight"]
    with pytest.raises(KeyError, match=r"experts \[5\] are missing"):
        adapter.from_hf(hf)
    with pytest.raises(KeyError, match="not a tensor of this model"):
        adapter.from_hf({"model.layers.9.mlp.gate.weight": torch.zeros(1)})


def test_config_json_round_trip(tmp_path):
    args = small_args(ssm_type="mamba2", logit_softcap=0.0)
    path = write_config(args, str(tmp_path), dtype=torch.bfloat16)
    config = json.loads(open(path).read())
    assert config["hidden_size"] == args.dim and config["tie_word_embeddings"] is True
    assert config["layer_types"][:3] == ["full_attention", "full_attention", "linear_attention"]
    assert read_config(str(tmp_path)) == args


@pytest.mark.slow
def test_dcp_hf_dcp_and_torch_save_round_trips(async_run, tmp_path):
    dump, _ = async_run
    step = str(dump / "checkpoint" / "step-6")
    hf, back, pt = tmp_path / "hf", tmp_path / "dcp", tmp_path / "full.pt"
    cmds = [
        ["dcp-to-hf", step, str(hf), "--config", "train_configs/debug_model.toml",
         "--training.seq_len", "64", "--max-shard-gb", "0.03"],
        ["hf-to-dcp", str(hf), str(back)],
        ["dcp-to-torch", step, str(pt)],
    ]
    for cmd in cmds:
        proc = subprocess.run([sys.executable, SCRIPT, *cmd], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_dcp(step)
    # several shards, an index naming each tensor's file, and a config.json
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(load_hf(str(hf)))
    assert read_config(str(hf)).n_layers == 6
    converted = load_dcp(str(back))
    assert converted.keys() == original.keys()
    for k, v in original.items():
        assert v.dtype == converted[k].dtype and torch.equal(v, converted[k]), k
    full = torch.load(pt, weights_only=False)
    everything = load_dcp(step, model_only=False)
    assert full["train_state"] == everything["train_state"] == {"step": 6, "ntokens_seen": 768}
    assert all(torch.equal(full[k], v) for k, v in original.items())
    assert len(everything["optimizer"]) > 100
    for key, value in everything["optimizer"].items():
        if torch.is_tensor(value):
            assert torch.equal(full["optimizer"][key], value), key


@pytest.mark.slow
def test_trainer_starts_from_a_converted_checkpoint(async_run, tmp_path):
    dump, _ = async_run
    hf, back = tmp_path / "hf", tmp_path / "dcp"
    for cmd in (["dcp-to-hf", str(dump / "checkpoint" / "step-8"), str(hf), "--config",
                 "train_configs/debug_model.toml", "--training.seq_len", "64"],
                ["hf-to-dcp", str(hf), str(back)]):
        subprocess.run([sys.executable, SCRIPT, *cmd], cwd=ROOT, check=True, capture_output=True)
    fresh = tmp_path / "fresh"
    log = run_train(fresh, "--training.steps", "1", "--checkpoint.interval", "100",
                    "--checkpoint.initial_load_path", str(back), "--checkpoint.initial_load_model_only")
    assert f"Loading the checkpoint from {back}" in log and "Training starts at step 1" in log
    # the trained weights see the first batch with a much lower loss than a fresh init
    assert tb_losses(fresh)[1] < tb_losses(dump)[1] - 1.0

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
from fusion_titan.checkpoint.state_dict_adapter import (
    FusionStateDictAdapter, read_config, read_rope_interleave, write_config,
)
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from trainer_runs import ROOT, run_train, tb_losses  # async_run: tests/conftest.py

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


# DeepSeek-V3's checkpoint names -> torchtitan deepseek_v3 Attention's parameter names
DEEPSEEK_TO_TORCHTITAN = {"q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
                          "q_proj": "wq", "kv_a_proj_with_mqa": "wkv_a",
                          "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}


def torchtitan_attention(hf: dict, prefix: str, args):
    """torchtitan 0.2.2's DeepSeek-V3 MLA with the exported tensors under `prefix`, and its
    rope table (same theta and length, no YaRN: max_seq_len <= original_seq_len)."""
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import Attention, precompute_freqs_cis

    tt_args = DeepSeekV3ModelArgs(
        dim=args.dim, n_heads=args.n_heads, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim,
        norm_eps=args.norm_eps, max_seq_len=args.max_seq_len, original_seq_len=args.max_seq_len,
        rope_theta=args.rope_theta, attn_type="sdpa")
    attention = Attention(tt_args)
    state = {}
    for name, tensor in hf.items():
        if name.startswith(prefix):
            module, leaf = name[len(prefix):].split(".")
            state[f"{DEEPSEEK_TO_TORCHTITAN[module]}.{leaf}"] = tensor
    attention.load_state_dict(state)  # strict: every tensor of the layer, nothing else
    return attention, precompute_freqs_cis(tt_args)


@pytest.mark.parametrize("q_lora_rank", [64, 0])
def test_exported_mla_matches_torchtitan_deepseek_v3_attention(q_lora_rank):
    """Our half-split RoPE exported in the interleaved layout: torchtitan's deepseek_v3
    Attention (interleaved complex rotation) computes our layer's output from the HF tensors,
    for the trunk's MLA and the MTP block's; the unpermuted tensors do not."""
    args = small_args(q_lora_rank=q_lora_rank, mtp_depth=1, max_seq_len=64)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    with torch.no_grad():  # O(1) weights, so the attention pattern is far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 24, args.dim)
    for native, prefix in (("layers.0.mixer", "model.layers.0.self_attn."),
                           ("mtp.0.block.mixer", "model.mtp.0.self_attn.")):
        ours = model.get_submodule(native)(x, model.rope)
        for interleave in (True, False):
            hf = FusionStateDictAdapter(args, rope_interleave=interleave).to_hf(model.state_dict())
            attention, freqs_cis = torchtitan_attention(hf, prefix, args)
            theirs = attention(x, freqs_cis, None)
            if interleave:
                torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
            else:
                assert (theirs - ours).abs().max() > 1e-2


def test_rope_layout_is_recorded_and_undone_on_import(tmp_path):
    args = small_args()
    write_config(args, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_interleave"] is True and config["qk_rope_head_dim"] == args.qk_rope_head_dim
    model = FusionModel(args)
    model.init_weights()
    state = model.state_dict()
    hf = FusionStateDictAdapter(args).to_hf(state)
    q_b, rope, nope = hf["model.layers.0.self_attn.q_b_proj.weight"], args.qk_rope_head_dim, args.qk_nope_head_dim
    head1 = slice(args.qk_nope_head_dim + rope, 2 * (nope + rope))  # head 1's rows
    ours_rope = state["layers.0.mixer.wq_b.weight"][head1][nope:]
    # interleaved pairs: exported row 2i is our row i, row 2i+1 our row i + rope/2
    assert torch.equal(q_b[head1][nope:][0::2], ours_rope[: rope // 2])
    assert torch.equal(q_b[head1][nope:][1::2], ours_rope[rope // 2:])
    assert torch.equal(q_b[head1][:nope], state["layers.0.mixer.wq_b.weight"][head1][:nope])
    kv_a = hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    ours_k = state["layers.0.mixer.wkv_a.weight"][args.kv_lora_rank:]
    assert torch.equal(kv_a[args.kv_lora_rank:][1::2], ours_k[rope // 2:])
    back = FusionStateDictAdapter(args).from_hf(hf)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # folders exported before the layout was recorded hold our order and load unpermuted
    del config["rope_interleave"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_rope_interleave(str(tmp_path)) is False

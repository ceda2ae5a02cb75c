"""`dcp-to-hf` folders load in Hugging Face transformers (trust_remote_code) and give our logits.

Skipped without transformers (the `hf` extra). The remote code is a self-contained port
(fusion_titan/checkpoint/hf_remote/), so these tests are its reference check: every mixer and
FFN kind, KV groups, a sliding window, muP logit scale and softcap, against FusionModel.
"""

import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fusion_titan.checkpoint.convert import dcp_to_hf, load_hf
from fusion_titan.data.tokenizer import TiktokenTokenizer
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from trainer_runs import ROOT

transformers = pytest.importorskip("transformers")


def exported(tmp_path, tokenizer=None, edit=None, **changes):
    """(our model, the folder dcp-to-hf wrote from its DCP checkpoint); edit(model) runs before the save."""
    args = FLAVORS["debugmodel"].replace(**{
        "vocab_size": 256, "n_layers": 4, "layer_schedule": "2:1", "max_seq_len": 64,
        "dim": 256, "mup_base_dim": 64, **changes})  # dim > base: the muP logit scale is 1/4
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    with torch.no_grad():  # move every tensor off its init (norm gains, decay, expert bias)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for layer in model.layers.values():
            if layer.moe_enabled:
                layer.moe.expert_bias.copy_(torch.randn_like(layer.moe.expert_bias) * 0.1)
        if edit is not None:
            edit(model)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = tmp_path / "hf"
    dcp_to_hf(str(tmp_path / "dcp"), str(out), args, tokenizer=tokenizer)
    return model.eval(), out


def load_hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("changes", [
    {},  # MLA + MoE, Gated DeltaNet, MTP (not loaded)
    {"ssm_type": "mamba2", "q_lora_rank": 0, "mla_kv_groups": 2, "sliding_window": 5},
    {"n_routed_experts": 0, "logit_softcap": 0.0, "mup": False, "mtp_depth": 0},
    {"moe_router": "softmax_topk", "moe_router_norm_topk": True},  # the expert bias is ignored
])
def test_transformers_loads_the_export_and_gives_our_logits(tmp_path, changes):
    ours, folder = exported(tmp_path, **changes)
    theirs = load_hf_model(folder)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(tokens)
        got = theirs(tokens).logits
    assert got.shape == expected.shape == (2, 24, 256)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.01  # the comparison is not between near-constant logits
    # every exported weight but the training-only MTP modules reached the transformers model
    loaded = set(theirs.state_dict())
    weights = set(load_hf(str(folder)))
    assert {n for n in weights if not n.startswith("model.mtp.")} <= loaded
    # generate() (no cache: the prefix is recomputed) continues like our greedy argmax
    prompt = tokens[:1, :6]
    with torch.no_grad():
        generated = theirs.generate(prompt, max_new_tokens=4, do_sample=False)
        greedy = prompt
        for _ in range(4):
            greedy = torch.cat([greedy, ours(greedy)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, greedy)
    # the loss transformers computes from labels = input_ids is our next-token CE
    with torch.no_grad():
        loss = theirs(tokens, labels=tokens).loss
        ce = ours(tokens[:, :-1], labels=tokens[:, 1:])["ce_sum"] / tokens[:, 1:].numel()
    torch.testing.assert_close(loss, ce, rtol=1e-4, atol=1e-4)


def _tie_every_router(model):
    """Every expert gets the same gate row and no bias: each token's scores tie exactly."""
    for layer in model.layers.values():
        if layer.moe_enabled:
            gate = layer.moe.router.gate.weight
            gate.copy_(gate[:1].expand_as(gate))
            layer.moe.expert_bias.zero_()


@pytest.mark.parametrize("router", ["deepseek", "softmax_topk"])
def test_export_breaks_router_ties_as_training_does(tmp_path, router):
    """Tied scores: the export chooses the experts training chooses (the lower index first), so
    the logits still match; the experts differ, so another choice would show."""
    ours, folder = exported(tmp_path, edit=_tie_every_router, moe_router=router)
    theirs = load_hf_model(folder)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
        moe = next(layer.moe for layer in ours.layers.values() if layer.moe_enabled)
        h = torch.randn(5, moe.dim)
        _, indices, scores = moe.router(h)[:3]
    assert (scores == scores[:, :1]).all()  # the ties are real
    assert indices.sort(-1).values.tolist() == [list(range(moe.top_k))] * 5


def test_export_files_are_readable_by_others_and_need_no_fusion_titan(tmp_path):
    _, folder = exported(tmp_path)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for name in ("configuration_fusion.py", "modeling_fusion.py"):
        assert "fusion_titan" not in "".join(
            line for line in (folder / name).read_text().splitlines(True)
            if line.startswith(("import", "from")))
    # a fresh interpreter that cannot import fusion_titan loads it and runs a forward
    code = ("import sys; sys.modules['fusion_titan'] = None\n"
            "import torch, transformers\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
            "print(tuple(m(torch.tensor([[1, 2, 3]])).logits.shape))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in sys.path if p and not os.path.isdir(os.path.join(p, "fusion_titan")))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(1, 3, 256)")


def test_tokenizer_files_encode_like_ours(tmp_path):
    _, folder = exported(tmp_path, tokenizer="qwen2.5")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    ours = TiktokenTokenizer("qwen2.5")
    text = (ROOT / "README.md").read_text()[:4000] + "\n\tünïcödé 你好 123456  x\r\n"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id
    assert stat.S_IMODE((folder / "tokenizer.json").stat().st_mode) == 0o644

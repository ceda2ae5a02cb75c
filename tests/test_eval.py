"""Evaluation from checkpoints: loading (DCP / torch.save), scripts/eval.py's perplexity against a
hand computation, and, slow, the whole chain on a checkpoint written by ./run_train.sh with
validation logged during training."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fusion_titan.inference.loading import (
    build_model, load_checkpoint, load_job_config, load_model, model_args_from_config,
)
from fusion_titan.training.validate import validation_dataloader
from trainer_runs import run_train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train_configs/debug_model.toml"
SMALL = ["--model.n_layers", "2", "--validation.seq_len", "32", "--validation.local_batch_size", "2"]


def script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_model(overrides=SMALL, seed=0):
    cfg = load_job_config(CONFIG, overrides)
    torch.manual_seed(seed)
    model = build_model(model_args_from_config(cfg))
    with torch.no_grad():  # make the MoE bias non-trivial so it must be loaded too
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_()
    return cfg, model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_dcp_folder_and_torch_save_file(tmp_path):
    _, model = random_model(seed=1)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "checkpoint" / "step-7"))
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pt")
    for where in (tmp_path / "checkpoint" / "step-7", tmp_path / "checkpoint", tmp_path,
                  tmp_path / "weights.pt"):
        loaded = load_model(CONFIG, where, overrides=SMALL)
        assert_same_state(loaded.model, model)
    assert loaded.model.tok_embeddings.weight.dtype == torch.float32
    half = load_model(CONFIG, tmp_path / "checkpoint", overrides=SMALL, dtype="bfloat16").model
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    assert half.rope.dtype == torch.float32  # positions keep full precision
    with pytest.raises(FileNotFoundError):
        load_checkpoint(model, tmp_path / "nothing-here")
    _, other = random_model(["--model.n_layers", "3"])
    with pytest.raises(Exception, match="layers.2"):
        load_checkpoint(other, tmp_path / "checkpoint")  # the checkpoint lacks layer 2


def test_eval_script_perplexity_equals_hand_computation(tmp_path):
    cfg, model = random_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = script("eval").main(["--config", str(CONFIG), "--checkpoint", str(tmp_path / "w.pt"),
                               "--steps", "3", "--json", str(tmp_path / "r.json"), *SMALL])
    assert json.loads((tmp_path / "r.json").read_text()) == out
    # by hand: full logits (softcap included), log-softmax, mean over every predicted token
    nll, count = 0.0, 0
    with torch.no_grad():
        for i, (batch, labels) in enumerate(validation_dataloader(1, 0, model_tokenizer(cfg), cfg)):
            if i == 3:
                break
            logp = model(batch["input"]).double().log_softmax(-1)
            nll -= logp.gather(-1, labels[..., None]).sum().item()
            count += labels.numel()
    assert out["batches"] == 3 and out["tokens"] == count == 3 * 2 * 32
    assert out["mean_ce"] == pytest.approx(nll / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def model_tokenizer(cfg):
    from fusion_titan.data.tokenizer import build_tokenizer

    return build_tokenizer(cfg)


@pytest.mark.slow
def test_run_train_checkpoint_feeds_eval_generate_and_lm_eval(tmp_path, capsys):
    """./run_train.sh for 4 steps with validation every 2 steps, then every tool on its checkpoint."""
    log = run_train(tmp_path, "--training.steps", "4", "--checkpoint.interval", "4",
                    "--checkpoint.keep_latest_k", "0", "--validation.enable", "--validation.freq", "2",
                    "--validation.steps", "2", "--validation.seq_len", "64",
                    "--validation.local_batch_size", "2")
    logged = {int(s): float(v) for s, v in re.findall(r"validate step:\s+(\d+)\s+ce: ([\d.]+)", log)}
    assert sorted(logged) == [1, 2, 4], log[-4000:]
    from fusion_titan.training.tb_scalars import read_scalars

    tb = read_scalars(tmp_path, "validation_metrics/loss")
    assert sorted(tb) == [1, 2, 4]
    assert all(abs(tb[s] - logged[s]) < 1e-3 for s in tb)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "step-4" / ".metadata").is_file()

    # eval.py over the same held-out batches reproduces the step-4 validation loss
    val = ["--validation.seq_len", "64", "--validation.local_batch_size", "2", "--training.seq_len", "64"]
    out = script("eval").main(["--config", str(CONFIG), "--checkpoint", str(ckpt), "--steps", "2", *val])
    assert out["checkpoint"].endswith("step-4")
    assert out["mean_ce"] == pytest.approx(tb[4], abs=1e-3)

    script("generate").main(["--config", str(CONFIG), "--checkpoint", str(ckpt), "--prompt", "import os\n",
                             "--max-new-tokens", "5", "--no-eos-stop", "--training.seq_len", "64"])
    printed = capsys.readouterr().out
    assert "step-4" in printed and "new tokens: 5" in printed and "cache bytes:" in printed

    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from lm_eval.api.instance import Instance

    from fusion_titan.inference.lm_eval_adapter import FusionLM

    lm = FusionLM(config=str(CONFIG), checkpoint=str(ckpt), overrides="--training.seq_len 64")
    (lp, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("import os", "\nimport sys"), 0)])
    assert math.isfinite(lp) and lp < 0

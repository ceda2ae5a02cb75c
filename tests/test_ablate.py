"""scripts/ablate.py: equal-FLOPs step counts, the sweep file, held-out data, and a real CPU sweep."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from fusion_titan.ablation.placement import SlotPool, gpu_slots, visible_devices
from fusion_titan.ablation.plan import budget_flops, parse_job_config, plan_variant, shape_of
from fusion_titan.ablation.runner import run_folder, summarize, wall_clock
from fusion_titan.ablation.timing import phases
from fusion_titan.ablation.sweep import SweepError, load_sweep, parse_sweep
from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel
from fusion_titan.training.preflight import ConfigError
from fusion_titan.training.tb_scalars import read_scalars

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "train_configs/debug_model.toml")
QUICK = ["--training.seq_len", "64", "--checkpoint.no-enable", "--validation.seq_len", "64",
         "--validation.local_batch_size", "2", "--validation.steps", "4"]


def attention_blocks(schedule: str, n_layers: int) -> int:
    if schedule in ("mha", "ssm"):
        return n_layers if schedule == "mha" else 0
    a, b = (int(x) for x in schedule.split(":"))
    return sum(1 for i in range(n_layers) if i % (a + b) < a)


def reference_flops_per_token(seq_len: int, **changes) -> float:
    """Training FLOPs per token written out here from the formula (docs/ablations.md), with the
    parameters counted from the module tree: 6 x active non-embedding parameters, the tied head per
    use, causal attention (half of the keys), Gated DeltaNet chunks of 64."""
    args = FLAVORS["debugmodel"].replace(**changes)
    with torch.device("meta"):
        model = FusionModel(args)
    named = dict(model.named_parameters())  # a tied weight appears once
    total = sum(p.numel() for p in named.values())
    routed = sum(p.numel() for n, p in named.items() if ".experts." in n)
    unused = routed * (args.n_routed_experts - args.n_activated_experts) / args.n_routed_experts \
        if args.n_routed_experts else 0
    embedding = args.vocab_size * args.dim
    n_attn = attention_blocks(args.layer_schedule, args.n_layers)
    n_gdn = args.n_layers - n_attn
    matmuls = 6 * (total - unused - embedding)
    head = 6 * (1 + args.mtp_depth) * args.vocab_size * args.dim
    attn = 3 * (n_attn + args.mtp_depth) * 2 * args.n_heads * (
        args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) * (seq_len + 1) / 2
    dk, dv = args.gdn_head_k_dim, args.gdn_head_v_dim
    gdn = 3 * n_gdn * args.gdn_n_heads * (64 * (3 * dk + 2 * dv) + 6 * dk * dv)
    return matmuls + head + attn + gdn


def expected_steps(budget: float, flops_per_token: float, tokens_per_step: int, k: int) -> int:
    return k * max(1, round(budget / (flops_per_token * tokens_per_step * k)))


def sweep_dict(variants: dict, **head) -> dict:
    return {"sweep": {"config": DEBUG, "overrides": list(QUICK), "budget_tokens": 1024, "seeds": [0],
                      "eval_points": 2, **head},
            "variants": {name: {"overrides": o} for name, o in variants.items()}}


VARIANTS = {
    "hybrid": ([], {}),
    "mla": (["--model.layer_schedule", "mha"], {"layer_schedule": "mha"}),
    "gdn": (["--model.layer_schedule", "ssm"], {"layer_schedule": "ssm"}),
    "dense": (["--model.n_routed_experts", "0", "--model.ffn_hidden_dim", "512"],
              {"n_routed_experts": 0, "ffn_hidden_dim": 512}),
    "mtp0": (["--model.mtp_depth", "0"], {"mtp_depth": 0}),
}


def test_step_counts_spend_equal_flops():
    sweep = parse_sweep(sweep_dict({n: o for n, (o, _) in VARIANTS.items()}, budget_tokens=8192),
                        Path("s.toml"))
    budget = budget_flops(sweep, ngpu=1)
    assert budget == pytest.approx(8192 * reference_flops_per_token(64), rel=1e-9)
    tokens_per_step = 2 * 64  # debug_model.toml: local batch 2, one rank
    counts = {}
    for variant in sweep.variants:
        (plan,) = plan_variant(sweep, variant, budget, 1, "")
        reference = reference_flops_per_token(64, **VARIANTS[variant.name][1])
        assert plan.shape.flops_per_token == pytest.approx(reference, rel=1e-9), variant.name
        assert plan.shape.tokens_per_step == tokens_per_step
        assert plan.steps == expected_steps(budget, reference, tokens_per_step, 2), variant.name
        assert abs(plan.flops - budget) <= reference * tokens_per_step * 2 / 2 + 1
        assert plan.steps % plan.eval_every == 0 and plan.eval_every % plan.log_every == 0
        args = plan.resolved
        assert args["training"]["steps"] == plan.steps and args["debug"]["seed"] == 0
        assert args["validation"]["enable"] and args["validation"]["freq"] == plan.steps // 2
        counts[variant.name] = plan.steps
    # fewer FLOPs per token (one use of the tied head less), more steps
    assert counts["mtp0"] > counts["hybrid"], counts


def test_ffn_hidden_dim_override_sets_the_dense_width():
    job = parse_job_config(DEBUG, ["--model.n_routed_experts", "0", "--model.ffn_hidden_dim", "200"])
    shape = shape_of(job, 1)
    plain = shape_of(parse_job_config(DEBUG, ["--model.n_routed_experts", "0"]), 1)
    # 6 trunk blocks + 1 MTP block, each a SwiGLU of 3 x dim x width
    assert shape.params_total - plain.params_total == 7 * 3 * 128 * (200 - 384)


def test_first_sweep_is_consistent():
    """The GPU sweep plans on CPU: every variant builds, the dense one matches the hybrid's
    active parameters, and every run is within half a block of evaluations of the budget."""
    sweep = load_sweep(ROOT / "train_configs/ablations/first_sweep.toml")
    sweep = sweep.__class__(**{**sweep.__dict__, "config": str(ROOT / sweep.config)})
    budget = budget_flops(sweep, ngpu=1)
    plans = {v.name: plan_variant(sweep, v, budget, 1, "") for v in sweep.variants}
    assert set(plans) == {"hybrid", "all_mla", "all_gdn", "dense", "adamw", "mtp0"}
    assert all(len(p) == 2 for p in plans.values())  # two seeds
    hybrid, dense = plans["hybrid"][0].shape, plans["dense"][0].shape
    assert dense.params_total == dense.params_active  # no routed experts left
    assert abs(dense.params_active / hybrid.params_active - 1) < 0.005
    for runs in plans.values():
        p = runs[0]
        assert abs(p.flops - budget) <= p.shape.flops_per_token * p.shape.tokens_per_step * 4 / 2
    assert plans["hybrid"][0].run_id != plans["hybrid"][1].run_id
    assert plans["hybrid"][0].steps == 256 and plans["adamw"][0].steps == 256


def test_second_sweep_scores_in_domain_held_out_data():
    """The second GPU sweep plans on CPU: the first sweep's variants at twice its budget, scored
    on the config's own held-out data (the stdlib's held-out tenth), 16 batches per evaluation,
    one GPU per run."""
    first = load_sweep(ROOT / "train_configs/ablations/first_sweep.toml")
    sweep = load_sweep(ROOT / "train_configs/ablations/second_sweep.toml")
    assert [v.overrides for v in sweep.variants] == [v.overrides for v in first.variants]
    assert sweep.val_data == "" and sweep.ngpu == 1 and sweep.budget_tokens == 2 * first.budget_tokens
    at = sweep.overrides.index("--validation.steps") + 1
    assert sweep.overrides[at] == "16"
    # the same base as the first sweep (model, optimizer, eager PyTorch GDN) but the evaluation
    assert sweep.overrides[:at] + sweep.overrides[at + 1:] == \
        first.overrides[:at] + first.overrides[at + 1:]
    sweep = sweep.__class__(**{**sweep.__dict__, "config": str(ROOT / sweep.config)})
    budget = budget_flops(sweep, ngpu=1)
    plans = {v.name: plan_variant(sweep, v, budget, 1, "")[0] for v in sweep.variants}
    assert plans["hybrid"].steps == 512 and plans["mtp0"].steps == 800
    assert all(abs(p.flops / budget - 1) < 0.005 for p in plans.values())


@pytest.mark.parametrize("change, message", [
    ({"overrides": ["--training.steps", "5"]}, "--training.steps is set by the harness"),
    ({"budget_flops": 1e12}, "exactly one of budget_tokens"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"evals": 3}, "unknown key"),
    ({"jobs": 0}, "jobs .runs trained at once. must be an integer >= 1"),
])
def test_bad_sweep_head_is_refused(change, message):
    data = sweep_dict({"a": []})
    data["sweep"].update(change)
    with pytest.raises(SweepError, match=message):
        parse_sweep(data, Path("s.toml"))


def test_variant_cannot_change_the_evaluation():
    with pytest.raises(SweepError, match="other batches"):
        parse_sweep(sweep_dict({"a": ["--validation.seq_len", "32"]}), Path("s.toml"))
    with pytest.raises(SweepError, match="variant name"):
        parse_sweep(sweep_dict({"a b": []}), Path("s.toml"))


def test_json_and_toml_sweeps_read_the_same(tmp_path):
    data = sweep_dict({"hybrid": [], "mla": ["--model.layer_schedule", "mha"]})
    (tmp_path / "s.json").write_text(json.dumps(data))
    toml = ["[sweep]", f'config = "{DEBUG}"', f"overrides = {json.dumps(QUICK)}",
            "budget_tokens = 1024", "seeds = [0]", "eval_points = 2",
            "[variants.hybrid]", "overrides = []",
            "[variants.mla]", 'overrides = ["--model.layer_schedule", "mha"]']
    (tmp_path / "s.toml").write_text("\n".join(toml) + "\n")
    a, b = load_sweep(tmp_path / "s.json"), load_sweep(tmp_path / "s.toml")
    assert (a.variants, a.overrides, a.budget_tokens, a.seeds) == (b.variants, b.overrides, b.budget_tokens, b.seeds)


def test_ramps_are_refused():
    job = parse_job_config(DEBUG, ["--training.batch_ramp", "1", "2", "--training.batch_ramp_steps", "0", "5"])
    with pytest.raises(ConfigError, match="constant tokens per step"):
        shape_of(job, 1)


def test_wall_clock_from_logged_throughput():
    # 100 tokens per step; 50 tok/s over steps 2-5 (4 steps: 8 s), 200 tok/s over 6-10 (2.5 s)
    seconds = wall_clock([1, 5, 10], {1: 1.0, 5: 50.0, 10: 200.0}, 100)
    assert seconds == {1: 0.0, 5: 8.0, 10: 10.5}


def test_phases_from_log_timestamps():
    """A run's log, written out by hand: 5 s to the first line, init ends at 12 s, step 1 at 20 s,
    evaluations at steps 1 (2 s) and 4 (3 s), steps 2-4 logged at 23, 24, 26 s, exit at 31 s."""
    def line(second: float, message: str) -> str:
        ms = round(second * 1000)
        return f"[rank0]:[titan] 2026-01-02 03:04:{ms // 1000:02d},{ms % 1000:03d} - root - INFO - {message}"
    log = "\n".join([
        "W0102 launcher noise",
        line(5, "Starting job: x"), line(12, "Training starts at step 1"),
        line(20, "step:  1/4  loss: 11.0  memory: 1GiB(1%)  tps: 10  mfu: n/a  eta: 1s"),
        line(22, "validate step:  1  ce: 11.0  perplexity: 9.0  tokens: 8  batches: 1"),
        line(22.5, "Synchronizing and adjusting timeout for all ProcessGroups to 0:01:40"),
        line(23, "step:  2/4  loss: 10.0  memory: 1GiB(1%)  tps: 10  mfu: n/a  eta: 1s"),
        line(24, "step:  3/4  loss: 9.0  memory: 1GiB(1%)  tps: 10  mfu: n/a  eta: 1s"),
        line(26, "step:  4/4  loss: 8.0  memory: 1GiB(1%)  tps: 10  mfu: n/a  eta: 0s"),
        line(29, "validate step:  4  ce: 8.5  perplexity: 9.0  tokens: 8  batches: 1"),
        line(29.2, "Sleeping 2 seconds for other ranks to complete"),
    ])
    start = datetime(2026, 1, 2, 3, 4, 0).timestamp()
    got = phases(log, start, start + 31)
    want = {"wall": 31, "init": 12, "first_step": 8, "startup": 20, "train": 6 - 2, "eval": 2 + 3, "shutdown": 2}
    assert got == pytest.approx(want, abs=1e-6)
    assert got["startup"] + got["train"] + got["eval"] + got["shutdown"] == pytest.approx(got["wall"])
    # a run killed during step 1: only what its log reached
    cut = phases(log.split("\n")[:3] and "\n".join(log.split("\n")[:3]), start, start + 15)
    assert cut["init"] == pytest.approx(12) and cut["startup"] is None and cut["train"] is None


def load_ablate_script():
    spec = importlib.util.spec_from_file_location("ablate_script", ROOT / "scripts/ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finished_run(plan, out: Path) -> dict:
    """What execute() leaves for a run that finished, from made-up TensorBoard scalars."""
    folder = run_folder(out, plan)
    folder.mkdir(parents=True)
    (folder / "train.log").write_text("the trainer's log\n")
    steps = range(1, plan.steps + 1)
    scalars = {"throughput(tps)": {s: 100.0 for s in steps},
               "loss_metrics/global_avg_loss": {s: 10.0 - s for s in steps},
               "validation_metrics/loss": {1: 11.0, plan.steps: 9.5}}
    timing = {"wall": 30.0, "init": 10.0, "first_step": 5.0, "startup": 15.0, "train": 10.0,
              "eval": 2.0, "shutdown": 3.0}
    result = summarize(plan, scalars, timing)
    (folder / "result.json").write_text(json.dumps(result))
    return result


def seed_major_plans(sweep, budget):
    return sorted([p for v in sweep.variants for p in plan_variant(sweep, v, budget, 1, "")], key=lambda p: p.seed)


def test_a_cut_sweep_keeps_a_partial_report_and_archive(tmp_path, monkeypatch):
    """The sweep is cut (KeyboardInterrupt: a device call's time running out) while its second
    run trains: the report, manifest, plots and the archive hold the first run and name the rest."""
    ablate = load_ablate_script()
    sweep = parse_sweep(sweep_dict({"hybrid": [], "mla": ["--model.layer_schedule", "mha"]}, seeds=[0, 1]),
                        tmp_path / "s.toml")
    budget = budget_flops(sweep, ngpu=1)
    plans = seed_major_plans(sweep, budget)
    trained = []

    def first_run_then_cut(plan, config, out, root, ngpu, timeout, extra_env=None):
        if trained:
            raise KeyboardInterrupt
        trained.append(plan)
        return finished_run(plan, out)

    monkeypatch.setattr(ablate, "execute", first_run_then_cut)
    out, archive = tmp_path / "sweep", tmp_path / "returned" / "sweep.tgz"
    with pytest.raises(KeyboardInterrupt):
        ablate.run_sweep(out, sweep, budget, 1, plans, [], archive=archive)

    assert [p.name for p in trained] == [plans[0].name]
    report = (out / "report.md").read_text()
    assert "Partial: 1 of 4 runs ended; not run yet: mla seed 0, hybrid seed 1, mla seed 1." in report
    assert "| hybrid | 1/2 |" in report and "| mla | 0/2 |" in report
    assert "| hybrid seed 0 | ok | visible | 30.0 | 10.0 | 5.0 | 15.0 | 10.0 | 2.0 | 3.0 |" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["ok", "not run", "not run", "not run"]
    assert manifest["runs"][0]["timing"]["startup"] == 15.0
    assert (out / "plots" / "heldout_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.rglob("*.partial")) and not list(archive.parent.glob("*.partial"))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert f"sweep/runs/{plans[0].name}/result.json" in names and "sweep/plots/heldout_vs_flops.png" in names
        assert tar.extractfile("sweep/report.md").read().decode() == report


def test_jobs_train_runs_at_once(tmp_path, monkeypatch):
    """jobs = 2: two runs are in execute() at the same time, every run ends in the outputs."""
    ablate = load_ablate_script()
    sweep = parse_sweep(sweep_dict({"hybrid": [], "mla": ["--model.layer_schedule", "mha"]}, seeds=[0, 1],
                                   jobs=2), tmp_path / "s.toml")
    budget = budget_flops(sweep, ngpu=1)
    plans = seed_major_plans(sweep, budget)
    inside, most = [0], [0]
    lock = threading.Lock()

    def slow_run(plan, config, out, root, ngpu, timeout, extra_env=None):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.5)
        with lock:
            inside[0] -= 1
        return finished_run(plan, out)

    monkeypatch.setattr(ablate, "execute", slow_run)
    out = tmp_path / "sweep"
    results = ablate.run_sweep(out, sweep, budget, 1, plans, [])
    assert most[0] == 2 and len(results) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["ok"] * 4 and manifest["jobs"] == 2
    report = (out / "report.md").read_text()
    assert "Partial" not in report and "| hybrid | 2/2 |" in report and "| mla | 2/2 |" in report
    assert "2 runs trained at once on the same GPU(s)" in report


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A held-out-only prepared directory made from text that is not the stdlib."""
    texts = tmp_path_factory.mktemp("texts")
    docs = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        docs[page.name] = page.read_text()
        (texts / page.name).write_text(docs[page.name])
    out = tmp_path_factory.mktemp("heldout") / "val"
    proc = subprocess.run([sys.executable, "scripts/prepare_data.py", "--out", str(out), "--source",
                           f"docs={texts}", "--val-fraction", "1.0", "--quiet", "--workers", "1",
                           "--no-near-dedup"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, docs


def test_val_fraction_one_holds_out_every_document(heldout):
    from fusion_titan.data.tokenizer import TiktokenTokenizer

    out, docs = heldout
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    shards = [r for r in lines if r["kind"] == "shard"]
    assert shards and all(r["split"] == "val" for r in shards)
    tok = TiktokenTokenizer("qwen2.5")
    expected = sum(len(tok.encode(text, add_eos=True)) for text in docs.values())
    assert sum(r["tokens"] for r in shards) == expected


@pytest.mark.slow
def test_sweep_runs_reports_and_resumes(tmp_path, heldout):
    val_dir, _ = heldout
    sweep = sweep_dict({"hybrid": [], "mla_no_mtp": ["--model.layer_schedule", "mha", "--model.mtp_depth", "0"],
                        "broken": ["--optimizer.name", "Bogus"]},
                       budget_tokens=512, val_data=str(val_dir), timeout_s=900)
    sweep["sweep"]["overrides"] += ["--lr_scheduler.warmup_steps", "1"]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    out = tmp_path / "out"
    env = dict(os.environ, FUSION_FORCE_CPU="1", NGPU="1", PYTHONUNBUFFERED="1")

    def ablate() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/ablate.py", str(path), "--out", str(out),
                               "--archive", str(tmp_path / "sweep.tgz")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)

    first = ablate()
    assert first.returncode == 1, first.stdout + first.stderr  # one variant failed, the others ran
    trained = lambda proc: [l for l in proc.stdout.splitlines() if l.startswith("training ")]  # noqa: E731
    assert len(trained(first)) == 3

    # equal FLOPs: step counts from the independent formula, and the runs really trained them
    budget = 512 * reference_flops_per_token(64)
    per_token = {"hybrid": reference_flops_per_token(64),
                 "mla_no_mtp": reference_flops_per_token(64, layer_schedule="mha", mtp_depth=0)}
    want = {name: expected_steps(budget, f, 128, 2) for name, f in per_token.items()}
    assert want["mla_no_mtp"] > want["hybrid"]
    manifest = json.loads((out / "manifest.json").read_text())
    runs = {r["variant"]: r for r in manifest["runs"]}
    for name, steps in want.items():
        assert runs[name]["status"] == "ok" and runs[name]["steps"] == steps
        losses = read_scalars(runs[name]["folder"], "loss_metrics/global_avg_loss")
        assert max(losses) == steps
        result = json.loads((Path(runs[name]["folder"]) / "result.json").read_text())
        assert result["flops"] == pytest.approx(steps * 128 * per_token[name], rel=1e-9)
        assert [p["step"] for p in result["curve"]] == [1, steps // 2, steps]
        assert [p["flops"] for p in result["curve"]] == pytest.approx(
            [s * result["flops"] / steps for s in (1, steps // 2, steps)], rel=1e-9)
        # where the time went: every phase measured, and together the process's wall time
        timing = result["timing"]
        assert all(timing[k] > 0 for k in ("init", "first_step", "train", "eval", "shutdown")), timing
        assert timing["startup"] + timing["train"] + timing["eval"] + timing["shutdown"] == \
            pytest.approx(timing["wall"], abs=1e-6)
        assert timing["shutdown"] >= 2  # torchtitan sleeps 2 s after the last step
        assert runs[name]["timing"] == timing
    curve = json.loads((Path(runs["mla_no_mtp"]["folder"]) / "result.json").read_text())["curve"]
    assert curve[-1]["heldout_ce"] < curve[0]["heldout_ce"]  # training lowered the held-out loss

    # the manifest's provenance
    assert len(manifest["git"]["commit"]) == 40
    assert manifest["packages"]["torch"] == torch.__version__
    assert manifest["packages"]["torchtitan"] == "0.2.2" and "triton" in manifest["packages"]
    assert manifest["device"].startswith("cpu")
    assert runs["broken"]["status"] == "failed" and runs["hybrid"]["seed"] == 0
    val_sha = hashlib.sha256((val_dir / "manifest.jsonl").read_bytes()).hexdigest()
    assert runs["hybrid"]["data"]["heldout"]["manifest_sha256"] == val_sha
    assert runs["hybrid"]["data"]["train"]["kind"] == "stdlib"
    assert runs["mla_no_mtp"]["resolved_config"]["model"]["layer_schedule"] == "mha"
    assert "--debug.seed" in runs["hybrid"]["command"]

    # the report: both variants' rows, the failure with its log's last lines, the plots
    report = (out / "report.md").read_text()
    assert report.count("| 1/1 |") == 2 and "| hybrid | 1/1 |" in report and "| mla_no_mtp | 1/1 |" in report and "| broken | 0/1 |" in report
    assert "## Failed runs" in report and "'Bogus' is not supported" in report
    assert "## Where the time went" in report and "Partial" not in report
    with tarfile.open(tmp_path / "sweep.tgz") as tar:  # the whole out folder, run folders too
        assert tar.extractfile("out/report.md").read().decode() == report
        assert f"out/runs/{Path(runs['hybrid']['folder']).name}/train.log" in tar.getnames()
    for png in ("heldout_vs_flops.png", "heldout_vs_wallclock.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        import matplotlib.pyplot as plt

        assert plt.imread(out / "plots" / png).shape[0] > 100

    # resume: nothing runs again, the finished results stay as they were
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    second = ablate()
    assert second.returncode == 1
    assert not trained(second) and second.stdout.count("skipped") == 3
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}


def test_an_unreadable_stored_result_makes_the_run_train_again(tmp_path):
    """An archive taken while a result was written (jobs > 1) may hold a truncated file: the
    resumed sweep must train that run again, not crash on it or skip it."""
    from fusion_titan.ablation.runner import FAILURE, RESULT, finished, write_atomic

    write_atomic(tmp_path / RESULT, json.dumps({"status": "ok"}))
    assert finished(tmp_path, retry_failed=False) == {"status": "ok"}
    (tmp_path / RESULT).write_text('{"status": "o')  # cut mid-write
    assert finished(tmp_path, retry_failed=False) is None
    (tmp_path / RESULT).unlink()
    write_atomic(tmp_path / FAILURE, json.dumps({"status": "failed"}))
    assert finished(tmp_path, retry_failed=False) == {"status": "failed"}
    assert finished(tmp_path, retry_failed=True) is None
    assert not list(tmp_path.glob("*.partial"))


def test_gpu_slots_are_disjoint_sets_of_ngpu_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(4) == ["0", "1", "2", "3"]
    assert gpu_slots(visible_devices(4), 1) == ["0", "1", "2", "3"]
    assert gpu_slots(visible_devices(4), 2) == ["0,1", "2,3"]
    assert gpu_slots(visible_devices(5), 2) == ["0,1", "2,3"]
    assert gpu_slots(visible_devices(2), 2) == [] and gpu_slots(visible_devices(1), 1) == []
    assert gpu_slots(visible_devices(0), 1) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # ids the runs must name are the listed ones
    assert gpu_slots(visible_devices(2), 1) == ["3", "5"]


def test_runs_at_once_train_on_their_own_gpus(tmp_path, monkeypatch):
    """2 GPU slots, jobs = 2: the two runs inside execute() at the same time never share a GPU,
    every run gets CUDA_VISIBLE_DEVICES, and the report says the GPU figures are unshared."""
    ablate = load_ablate_script()
    sweep = parse_sweep(sweep_dict({"hybrid": [], "mla": ["--model.layer_schedule", "mha"]}, seeds=[0, 1],
                                   jobs=2), tmp_path / "s.toml")
    budget = budget_flops(sweep, ngpu=1)
    plans = seed_major_plans(sweep, budget)
    busy, seen, clash = set(), [], []
    lock = threading.Lock()

    def placed_run(plan, config, out, root, ngpu, timeout, extra_env=None):
        gpu = extra_env["CUDA_VISIBLE_DEVICES"]
        with lock:
            clash.append(gpu in busy)
            busy.add(gpu)
            seen.append(gpu)
        time.sleep(0.3)
        with lock:
            busy.discard(gpu)
        return finished_run(plan, out)

    monkeypatch.setattr(ablate, "execute", placed_run)
    out = tmp_path / "sweep"
    pool = SlotPool(["0", "1"], sweep.jobs)
    results = ablate.run_sweep(out, sweep, budget, 1, plans, [], pool=pool)
    assert len(results) == 4 and not any(clash) and set(seen) == {"0", "1"}
    assert "each on its own GPU(s)" in (out / "report.md").read_text()
    assert "unshared" in json.loads((out / "manifest.json").read_text())["placement"]


def test_more_jobs_than_gpu_slots_share_them_in_turn():
    pool = SlotPool(["0", "1"], 4)
    held = []
    with pool.env() as a, pool.env() as b, pool.env() as c, pool.env() as d:
        held = [a, b, c, d]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in held) == ["0", "0", "1", "1"]
    assert "up to 2 per set" in pool.describe(4)
    with SlotPool([], 3).env() as env:
        assert env == {}


def _fake_root(tmp_path, exit_code: int) -> Path:
    """A repository root whose run_train.sh prints a line and exits with exit_code."""
    root = tmp_path / "root"
    root.mkdir()
    script = root / "run_train.sh"
    script.write_text(f"#!/usr/bin/env bash\necho 'training... cut'\nexit {exit_code}\n")
    script.chmod(0o755)
    return root


@pytest.mark.parametrize("stopping", [False, True], ids=["run-failed", "sweep-stopping"])
def test_a_run_ended_by_the_sweeps_stop_trains_again_on_resume(tmp_path, stopping):
    """A run that exits non-zero while the sweep is being stopped (Ctrl-C / timeout reach it too)
    is "interrupted": no failure.json, so a resumed sweep trains it without --retry-failed; the
    same exit without a stop is a failure, stored and skipped on resume."""
    from fusion_titan.ablation import runner
    from fusion_titan.ablation.report import markdown

    sweep = parse_sweep(sweep_dict({"hybrid": []}, seeds=[0]), tmp_path / "s.toml")
    plan = seed_major_plans(sweep, budget_flops(sweep, ngpu=1))[0]
    out = tmp_path / "sweep"
    if stopping:
        runner.STOPPING.set()
    try:
        result = runner.execute(plan, sweep.config, out, _fake_root(tmp_path, 130), 1, 60)
    finally:
        runner.STOPPING.clear()
    folder = runner.run_folder(out, plan)
    assert result["exit_code"] == 130 and "training... cut" in (folder / runner.LOG).read_text()
    if stopping:
        assert result["status"] == runner.INTERRUPTED
        assert not (folder / runner.FAILURE).exists() and not (folder / runner.RESULT).exists()
        assert runner.finished(folder, retry_failed=False) is None  # trains again
        report = markdown("r", [], [result], ["hybrid"], [], [])
        assert "### hybrid, seed 0 (exit code 130, interrupted: it trains again when the sweep is resumed)" in report
    else:
        assert result["status"] == "failed"
        assert runner.finished(folder, retry_failed=False)["status"] == "failed"  # skipped on resume


def test_the_sweeps_signal_handler_marks_the_stop_before_interrupting():
    from fusion_titan.ablation import runner

    ablate = load_ablate_script()
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        ablate.stop_on_signals()
        runner.STOPPING.clear()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert runner.STOPPING.is_set()
        assert signal.getsignal(signal.SIGTERM) == saved[1]  # other signals keep their handlers
    finally:
        runner.STOPPING.clear()
        signal.signal(signal.SIGINT, saved[0])

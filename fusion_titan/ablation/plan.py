"""Equal training FLOPs: how many steps each variant of a sweep gets, and each run's exact command.

A variant's training FLOPs per token are the trainer's own MFU count (fusion_titan/model/flops.py:
6 x active parameters + attention + recurrent mixer + the tied head per use), from the model
built on the meta device with the variant's resolved arguments. With T tokens per optimizer step
(global batch x seq_len) and F FLOPs per token, a budget B gives

    steps = k * max(1, round(B / (F * T * k)))        k = eval_points

so the run ends on an evaluation; every run is then within F * T * k / 2 of the budget (the
report lists what each spent). `budget_tokens` is read as the tokens of the *base* (the sweep's
config and common overrides without any variant's): B = budget_tokens x F_base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.global_batch import batch_plan
from ..inference.loading import load_job_config
from ..model.flops import count_params, flops_per_token
from ..model.model import FusionModel
from ..training.preflight import ConfigError, model_args
from .sweep import Sweep, Variant


@dataclass(frozen=True)
class Shape:
    """What the FLOPs count of one resolved configuration gives."""

    params_total: int
    params_active: int
    flops_per_token: int
    tokens_per_step: int  # global: sequences per optimizer step x seq_len
    dp_degree: int


@dataclass(frozen=True)
class RunPlan:
    variant: str
    seed: int
    steps: int
    eval_every: int  # [validation] freq: evaluations at step 1 and every eval_every steps
    log_every: int  # [metrics] log_freq, a divisor of eval_every (so the last step is logged)
    shape: Shape
    args: tuple[str, ...]  # every CLI override after --job.config_file, dump folder excluded
    run_id: str  # hash of the TOML text, the overrides, the seed and the GPU count
    resolved: dict  # the JobConfig as the trainer parses it (for the manifest)

    @property
    def tokens(self) -> int:
        return self.steps * self.shape.tokens_per_step

    @property
    def flops(self) -> int:
        return self.tokens * self.shape.flops_per_token

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}-{self.run_id}"


def parse_job_config(config: str, overrides: list[str] | tuple[str, ...]):
    """torchtitan's ConfigManager on the TOML + overrides, as the trainer parses them. A bad key
    becomes a ConfigError carrying tyro's message (tyro itself would exit the process)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return load_job_config(config, overrides)
    except SystemExit:
        raise ConfigError(f"{config} with {' '.join(overrides)}: {err.getvalue().strip()[-1500:]}") from None


def dp_degree(job_config, ngpu: int) -> int:
    p = job_config.parallelism
    others = p.tensor_parallel_degree * p.pipeline_parallel_degree * p.context_parallel_degree
    return max(1, ngpu // others)


def shape_of(job_config, ngpu: int) -> Shape:
    """Parameters, training FLOPs per token and global tokens per step of a resolved config.

    Batch or sequence-length ramps are refused: a step count would not map to one token count."""
    t = job_config.training
    if t.batch_ramp or t.seq_len_ramp:
        raise ConfigError("[training] batch_ramp / seq_len_ramp are set: the equal-FLOPs step count "
                          "needs constant tokens per step; remove the ramps from the sweep's base TOML")
    args = model_args(job_config)
    with torch.device("meta"):
        model = FusionModel(args)
    counts = count_params(model, args)
    dp = dp_degree(job_config, ngpu)
    plan = batch_plan(job_config, dp, 0)
    return Shape(counts.total, counts.active, flops_per_token(args, t.seq_len, counts),
                 plan.global_rows(0) * t.seq_len, dp)


def steps_for_budget(budget_flops: float, shape: Shape, eval_points: int) -> int:
    per_block = shape.flops_per_token * shape.tokens_per_step * eval_points
    return eval_points * max(1, round(budget_flops / per_block))


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


def budget_flops(sweep: Sweep, ngpu: int) -> float:
    if sweep.budget_flops is not None:
        return float(sweep.budget_flops)
    base = shape_of(parse_job_config(sweep.config, sweep.overrides), ngpu)
    return float(sweep.budget_tokens) * base.flops_per_token


def run_id(config_text: str, args: tuple[str, ...], seed: int, ngpu: int) -> str:
    blob = json.dumps({"toml": config_text, "args": list(args), "seed": seed, "ngpu": ngpu})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def plan_variant(sweep: Sweep, variant: Variant, budget: float, ngpu: int, val_data: str) -> list[RunPlan]:
    """One RunPlan per seed. Raises ConfigError (or ValueError) when the variant cannot be built."""
    overrides = [*sweep.overrides, *variant.overrides]
    job_config = parse_job_config(sweep.config, overrides)
    shape = shape_of(job_config, ngpu)
    steps = steps_for_budget(budget, shape, sweep.eval_points)
    eval_every = steps // sweep.eval_points
    log_every = largest_divisor_at_most(eval_every, job_config.metrics.log_freq)
    config_text = Path(sweep.config).read_text()
    plans = []
    for seed in sweep.seeds:
        args = (*overrides, "--training.steps", str(steps), "--debug.seed", str(seed),
                "--data.seed", str(seed), "--validation.enable", "--validation.freq", str(eval_every),
                "--metrics.log_freq", str(log_every), "--metrics.enable_tensorboard",
                *(("--data.val_path", val_data) if val_data else ()))
        resolved = parse_job_config(sweep.config, args)
        plans.append(RunPlan(variant.name, seed, steps, eval_every, log_every, shape, args,
                             run_id(config_text, args, seed, ngpu),
                             json.loads(json.dumps(dataclasses.asdict(resolved), default=str))))
    return plans


def default_ngpu() -> int:
    """What run_train.sh starts when NGPU is unset."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


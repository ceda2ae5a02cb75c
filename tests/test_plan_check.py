"""Parallel plans that cannot shard are refused up front, naming the key; the fusion_7b dry run."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusion_titan.infra.plan_check import check_parallel_plan

ROOT = Path(__file__).resolve().parents[1]


def plan(**kw):
    base = dict(data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                context_parallel_degree=1, tensor_parallel_degree=1, pipeline_parallel_degree=1,
                expert_parallel_degree=1, expert_tensor_parallel_degree=1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_valid_plans_pass():
    check_parallel_plan(plan(expert_parallel_degree=8), world_size=8, n_routed_experts=64)
    check_parallel_plan(plan(data_parallel_shard_degree=4, data_parallel_replicate_degree=2,
                             expert_parallel_degree=2), world_size=8, n_routed_experts=64)
    check_parallel_plan(plan(), world_size=1, n_routed_experts=0)


@pytest.mark.parametrize("kw, world, experts, words", [
    (dict(expert_parallel_degree=3), 8, 64, ["expert_parallel_degree 3", "n_routed_experts 64"]),
    (dict(expert_parallel_degree=16), 8, 64, ["expert_parallel_degree 16", "must divide"]),
    (dict(expert_parallel_degree=2), 2, 0, ["n_routed_experts = 0"]),
    (dict(data_parallel_shard_degree=4), 8, 64, ["data_parallel_shard_degree 4", "-1"]),
    (dict(data_parallel_replicate_degree=3), 8, 64, ["divide the number of GPUs"]),
])
def test_impossible_plans_name_the_key(kw, world, experts, words):
    with pytest.raises(ValueError) as err:
        check_parallel_plan(plan(**kw), world_size=world, n_routed_experts=experts)
    for w in words:
        assert w in str(err.value)


def run_dry(*overrides):
    return subprocess.run([sys.executable, "scripts/dry_run.py", "--", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_fusion_7b_dry_run_on_8_fake_ranks():
    proc = run_dry("--parallelism.expert_parallel_degree", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8 ranks" in out and "EP 8" in out and "17.155B total" in out
    # Every routed expert lives on exactly one of the 8 ranks; everything else is FSDP-sharded.
    assert "routed experts 1.887B" in out, out
    assert "| **total** |" in out


def test_dry_run_refuses_an_impossible_plan():
    proc = run_dry("--parallelism.expert_parallel_degree", "3")
    assert proc.returncode != 0
    assert "expert_parallel_degree 3 must divide n_routed_experts 64" in proc.stderr

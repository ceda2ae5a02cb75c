"""The data a step sees does not depend on the number of ranks, for both row sources: the slices
of 1, 2 and 4 data-parallel ranks, with and without gradient accumulation, put together give the
same global batch step by step, and a position saved on 2 ranks resumes on 1."""

import itertools

import numpy as np
import pytest
import torch

from fusion_titan.data.global_batch import BatchPlan, batch_plan
from fusion_titan.data.mixture import build_curriculum
from fusion_titan.data.packed_documents import PackedDocumentLoader
from fusion_titan.data.shard_loader import ShardLoader, SourceStream
from fusion_titan.data.shards import read_manifest
from fusion_titan.data.tokenizer import TiktokenTokenizer
from fusion_titan.training.ramp import Ramp
from test_data_pipeline import make_prepared

GLOBAL = 8  # sequences per optimizer step
# (ranks, micro-batches per step): local rows = GLOBAL / (ranks x micro-batches)
SPLITS = [(1, 1), (2, 1), (4, 1), (1, 4), (2, 2), (4, 2)]
SEQ_RAMP = Ramp((0, 2), (8, 16))
ROWS_RAMP = Ramp((0, 3), (GLOBAL, 2 * GLOBAL))  # the batch ramp is in sequences per step too


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer("qwen2.5")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tok):
    # token value = position within the source + offset: every row tells where it came from
    return make_prepared(tmp_path_factory.mktemp("global"), tok,
                         {"a": [np.arange(0, 9_000), np.arange(9_000, 20_000)],
                          "b": [np.arange(100_000, 107_000)]})


def stdlib_loader(tok, plan, prefetch=0):
    docs = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + i)) for i in range(40)]
    return PackedDocumentLoader(docs, str, tok, plan, seed=3, prefetch=prefetch, document_ids=True)


def shard_loader(path, tok, plan, prefetch=0):
    m = read_manifest(path)
    streams = [SourceStream(n, m, m.shards_of(n), 5) for n in m.sources()]
    cur = build_curriculum(["a=3 b=1", "a=1 b=3"], [0, 2], m.sources(), {s.name: s.total for s in streams})
    return ShardLoader(streams, cur, plan, seed=5, prefetch=prefetch, eos_id=tok.eos_id, document_ids=True)


LOADERS = {"stdlib": lambda tok, path, plan, **kw: stdlib_loader(tok, plan, **kw),
           "shards": lambda tok, path, plan, **kw: shard_loader(path, tok, plan, **kw)}


def plan(rank, world, accum, ramps=False):
    if ramps:
        return BatchPlan(rank, world, accum, SEQ_RAMP, ROWS_RAMP)
    return BatchPlan(rank, world, accum, Ramp.constant(16), Ramp.constant(GLOBAL))


def global_batches(loaders: list, accum: int, steps: int, skip: int = 0) -> list[dict[str, torch.Tensor]]:
    """Step by step, the rows of every rank's micro-batches in the order (micro-batch k, rank r)."""
    streams = [itertools.islice(iter(ld), skip * accum, (skip + steps) * accum) for ld in loaders]
    per_rank = [list(s) for s in streams]
    out = []
    for s in range(steps):
        parts = [per_rank[r][s * accum + k][0] for k in range(accum) for r in range(len(loaders))]
        out.append({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
    return out


def run(kind, tok, path, world, accum, steps, ramps=False, prefetch=0):
    loaders = [LOADERS[kind](tok, path, plan(r, world, accum, ramps), prefetch=prefetch) for r in range(world)]
    return global_batches(loaders, accum, steps)


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"step {step}: {key} differs"


@pytest.mark.parametrize("kind", ["stdlib", "shards"])
@pytest.mark.parametrize("ramps", [False, True], ids=["constant", "ramps"])
def test_every_split_gives_the_same_global_batch(kind, ramps, tok, synthetic):
    reference = run(kind, tok, synthetic, 1, 1, steps=5, ramps=ramps)
    shapes = [tuple(b["input"].shape) for b in reference]
    assert shapes == ([(8, 8)] * 2 + [(8, 16)] + [(16, 16)] * 2 if ramps else [(8, 16)] * 5)
    for world, accum in SPLITS[1:]:
        assert_same(run(kind, tok, synthetic, world, accum, steps=5, ramps=ramps), reference)
    # the rows are not all the same (the comparison could not pass vacuously)
    rows = torch.cat([b["input"][:, :8] for b in reference])
    assert len({tuple(r.tolist()) for r in rows}) == len(rows)


def test_shard_rows_follow_the_curriculum_by_step(tok, synthetic):
    """Stage 2 starts after step 2 whatever the split: the source mix of steps 1-2 is a-heavy."""
    batches = run("shards", tok, synthetic, 2, 2, steps=40)
    frac_a = [float((b["input"][:, 0] < 100_000).float().mean()) for b in batches]
    assert np.mean(frac_a[:2]) > 0.5 and np.mean(frac_a[2:]) < 0.4


@pytest.mark.parametrize("kind", ["stdlib", "shards"])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_on_one_rank_from_a_position_saved_on_two(kind, prefetch, tok, synthetic):
    straight = run(kind, tok, synthetic, 2, 1, steps=6, ramps=True)
    two = [LOADERS[kind](tok, synthetic, plan(r, 2, 1, ramps=True), prefetch=prefetch) for r in range(2)]
    its = [iter(ld) for ld in two]
    for it in its:
        for _ in range(3):  # 3 optimizer steps
            next(it)
    states = [ld.state_dict() for ld in two]
    assert states[0] == states[1]  # the same on every rank: saved once
    del its
    for world, accum in [(1, 1), (1, 2), (4, 1)]:
        resumed = [LOADERS[kind](tok, synthetic, plan(r, world, accum, ramps=True), prefetch=prefetch)
                   for r in range(world)]
        for ld in resumed:
            ld.load_state_dict(states[0])
        assert_same(global_batches(resumed, accum, steps=3), straight[3:])


@pytest.mark.parametrize("kind", ["stdlib", "shards"])
def test_a_position_saved_mid_step_needs_the_same_split(kind, tok, synthetic):
    ld = LOADERS[kind](tok, synthetic, plan(0, 2, 2))
    next(iter(ld))  # the first of 2 micro-batches of step 1
    with pytest.raises(ValueError, match="middle of optimizer step 1"):
        LOADERS[kind](tok, synthetic, plan(0, 1, 2)).load_state_dict(ld.state_dict())
    with pytest.raises(ValueError, match="middle of optimizer step 1"):
        LOADERS[kind](tok, synthetic, BatchPlan(0, 2, 2, Ramp.constant(16), Ramp.constant(16))).load_state_dict(
            ld.state_dict())
    same = LOADERS[kind](tok, synthetic, plan(1, 2, 2))  # same split, another rank: fine
    same.load_state_dict(ld.state_dict())
    assert same.position.microbatch == 1


class _Cfg:
    def __init__(self, **training):
        defaults = dict(local_batch_size=2, global_batch_size=-1, seq_len=64, seq_len_ramp=[],
                        seq_len_ramp_steps=[], batch_ramp=[], batch_ramp_steps=[])
        self.training = type("Training", (), {**defaults, **training})()


def test_batch_plan_from_the_config():
    p = batch_plan(_Cfg(local_batch_size=2, global_batch_size=16), dp_world_size=2, dp_rank=1)
    assert (p.microbatches_per_step, p.local_rows(0), p.mine(0), p.group(0, 3)) == (4, 2, range(2, 4), (12, 4))
    ramped = batch_plan(_Cfg(global_batch_size=16, batch_ramp=[8, 16], batch_ramp_steps=[0, 10]), 2, 0)
    assert [ramped.local_rows(s) for s in (0, 10)] == [1, 2]
    with pytest.raises(ValueError, match="multiples of data-parallel ranks x micro-batches"):
        batch_plan(_Cfg(global_batch_size=16, batch_ramp=[4, 16], batch_ramp_steps=[0, 10]), 2, 0)
    with pytest.raises(ValueError, match="above 16"):
        batch_plan(_Cfg(global_batch_size=16, batch_ramp=[8, 32], batch_ramp_steps=[0, 10]), 2, 0)

"""The stdlib packed loader: real text, rows against an independent packing, exact resume, the
held-out split, and errors that name the fix."""

import itertools
import random

import pytest
import torch

from fusion_titan.data.global_batch import BatchPlan
from fusion_titan.data.packed_documents import PackedDocumentLoader
from fusion_titan.data.stdlib_corpus import (HELD_OUT_FRACTION, read_document, stdlib_files,
                                             stdlib_split)
from fusion_titan.data.tokenizer import TiktokenTokenizer
from fusion_titan.training.ramp import Ramp

DOCS = [f"document {i}: " + "word " * (5 + 3 * i) for i in range(9)]


@pytest.fixture(scope="module")
def tokenizer():
    return TiktokenTokenizer("qwen2.5")


def plan(rank=0, world=1, accum=1, seq_len=32, rows=2, seq_ramp=None, rows_ramp=None):
    return BatchPlan(rank, world, accum, seq_ramp or Ramp.constant(seq_len), rows_ramp or Ramp.constant(rows))


def make(tokenizer, docs=DOCS, seed=0, infinite=True, prefetch=0, doc_ids=False, **shape):
    return PackedDocumentLoader(docs, str, tokenizer, plan(**shape), seed=seed, infinite=infinite,
                                prefetch=prefetch, document_ids=doc_ids)


def test_qwen_tokenizer_is_the_real_one(tokenizer):
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.eos_id == 151643
    assert tokenizer.get_vocab_size() <= 152064


def test_stdlib_corpus_is_real_text():
    files = stdlib_files()
    assert len(files) > 100
    assert "def " in read_document(files[0]) or "class " in read_document(files[0])


def test_stdlib_listing_is_the_rglob_one(tmp_path):
    """The pruned walk lists what `sorted(root.rglob("*.py"))` minus skipped folders did, in the
    same order: on a tree with skipped, symlinked and small files, and on the real stdlib."""
    from fusion_titan.data.stdlib_corpus import _SKIP_PARTS, stdlib_root

    def by_rglob(root):
        return [p for p in sorted(root.rglob("*.py")) if not _SKIP_PARTS.intersection(p.relative_to(root).parts)
                and 512 <= p.stat().st_size <= 400_000]

    for folder in ("a/b", "a/test", "site-packages/x", "c"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("a/z.py", "a/b/y.py", "a/b/B.py", "a/test/t.py", "site-packages/x/s.py", "c/c.py", "a.py"):
        (tmp_path / name).write_text("x = 1\n" * 200)
    (tmp_path / "a/b/small.py").write_text("x = 1\n")
    (tmp_path / "link").symlink_to(tmp_path / "c", target_is_directory=True)
    listed = stdlib_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in listed] == ["a/b/B.py", "a/b/y.py", "a/z.py", "a.py", "c/c.py"]
    assert listed == by_rglob(tmp_path)
    assert stdlib_files() == by_rglob(stdlib_root())


def test_rows_are_the_seeded_document_stream_packed(tokenizer):
    """Against an independent packing: shuffle, tokenize + EOS, concatenate, rows of 33 tokens
    that overlap by one (a row's last label is the next row's first input)."""
    order = list(range(len(DOCS)))
    random.Random(0).shuffle(order)
    stream = [t for i in order for t in tokenizer.encode(DOCS[i]) + [tokenizer.eos_id]]
    expected = torch.tensor([stream[32 * j : 32 * j + 33] for j in range(6)])
    batches = list(itertools.islice(iter(make(tokenizer)), 3))
    inputs = torch.cat([b[0]["input"] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(inputs, expected[:, :-1]) and torch.equal(labels, expected[:, 1:])
    assert torch.equal(batches[0][0]["labels"], batches[0][1])


def test_resume_is_batch_exact_with_prefetch(tokenizer):
    for prefetch in (0, 3):
        straight = list(itertools.islice(iter(make(tokenizer)), 12))
        first = make(tokenizer, prefetch=prefetch)
        it = iter(first)
        for _ in range(5):
            next(it)
        state = first.state_dict()  # the thread has run ahead by now: the state must not follow it
        del it
        resumed = make(tokenizer, prefetch=prefetch)
        resumed.load_state_dict(state)
        rest = list(itertools.islice(iter(resumed), 7))
        for (a, la), (b, lb) in zip(straight[5:], rest):
            assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)


def test_finite_stream_stops_at_the_end_of_the_documents_on_every_rank(tokenizer):
    docs = [f"only-in-doc-{i} " * 40 for i in range(6)]
    per_rank = [list(make(tokenizer, docs=docs, rank=r, world=2, rows=2, infinite=False)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # unequal counts would hang collectives
    text = tokenizer.decode(torch.cat([b[0]["input"].flatten() for r in per_rank for b in r]).tolist())
    assert all(f"only-in-doc-{i}" in text for i in range(6))


def test_resume_on_other_corpus_is_refused(tokenizer):
    state = make(tokenizer).state_dict()
    with pytest.raises(ValueError, match="same corpus"):
        make(tokenizer, docs=["a", "b"]).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(tokenizer, seed=1).load_state_dict(state)


def test_seed_changes_order(tokenizer):
    a = next(iter(make(tokenizer, seed=0)))[1]
    b = next(iter(make(tokenizer, seed=1)))[1]
    assert not torch.equal(a, b)


def test_ramps_follow_the_optimizer_step_and_resume_exactly(tokenizer):
    docs = [f"document {i}: " + "word " * 40 for i in range(20)]

    def ramped():  # 2 micro-batches per step; the batch ramp counts sequences per step
        return make(tokenizer, docs=docs, accum=2, seq_ramp=Ramp((0, 2), (8, 32)),
                    rows_ramp=Ramp((0, 3), (2, 8)))

    shapes = [tuple(b[1].shape) for b in itertools.islice(iter(ramped()), 10)]
    # steps 0-1 at (1, 8), step 2 at (1, 32), steps 3+ at (4, 32) per micro-batch
    assert shapes == [(1, 8)] * 4 + [(1, 32)] * 2 + [(4, 32)] * 4

    straight = list(itertools.islice(iter(ramped()), 9))
    first = ramped()
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = ramped()
    resumed.load_state_dict(first.state_dict())
    for (a, la), (b, lb) in zip(straight[3:], itertools.islice(iter(resumed), 6)):
        assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)


def test_document_ids_mark_each_document(tokenizer):
    (x, _), = itertools.islice(iter(make(tokenizer, doc_ids=True)), 1)
    ids, eos = x["document_ids"], tokenizer.eos_id
    for row, row_ids in zip(x["input"], ids):  # the id goes up by one right after every EOS
        expected = torch.cat([torch.zeros(1, dtype=torch.int64), (row[:-1] == eos).long().cumsum(0)])
        assert torch.equal(row_ids.long(), expected)


def test_ramp_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="seq_len_ramp_steps"):
        Ramp.from_config("seq_len_ramp", [128, 256], [5, 10], default=256)
    with pytest.raises(ValueError, match="2 values but 1 steps"):
        Ramp.from_config("seq_len_ramp", [128, 256], [0], default=256)
    with pytest.raises(ValueError, match="above 256"):
        Ramp.from_config("seq_len_ramp", [128, 512], [0, 10], default=256, maximum=256)
    assert Ramp.from_config("batch_ramp", [], [], default=8)(1000) == 8
    assert Ramp.from_config("seq_len_ramp", [128, 256], [0, 10], default=256)(10) == 256


def test_held_out_stdlib_files_are_a_tenth_never_trained_on():
    files = stdlib_files()
    train, held = stdlib_split(files)
    assert held and not set(train) & set(held) and set(train) | set(held) == set(files)
    size = lambda fs: sum(f.stat().st_size for f in fs)  # noqa: E731
    assert HELD_OUT_FRACTION <= size(held) / size(files) < HELD_OUT_FRACTION + 0.05
    assert stdlib_split(list(reversed(files)))[1] == list(reversed(held))  # by name, not by order

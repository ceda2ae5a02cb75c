"""The packed document loader: real stdlib text, exact resume, rank split, clear errors."""

import itertools

import pytest
import torch

from fusion_titan.data.dataloader import PackedDocumentLoader
from fusion_titan.data.stdlib_corpus import read_document, stdlib_files
from fusion_titan.data.tokenizer import TiktokenTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return TiktokenTokenizer("qwen2.5")


def make(tokenizer, docs=None, rank=0, world=1, seq_len=32, batch=2, seed=0, infinite=True):
    docs = docs if docs is not None else [f"document {i}: " + "word " * (5 + 3 * i) for i in range(9)]
    return PackedDocumentLoader(docs, str, tokenizer, seq_len=seq_len, batch_size=batch,
                                dp_rank=rank, dp_world_size=world, seed=seed, infinite=infinite)


def test_qwen_tokenizer_is_the_real_one(tokenizer):
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.eos_id == 151643
    assert tokenizer.get_vocab_size() <= 152064


def test_stdlib_corpus_is_real_text():
    files = stdlib_files()
    assert len(files) > 100
    assert "def " in read_document(files[0]) or "class " in read_document(files[0])


def test_labels_are_inputs_shifted_and_rows_chain(tokenizer):
    batches = list(itertools.islice(iter(make(tokenizer)), 3))
    inputs = torch.cat([b[0]["input"] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(batches[0][0]["labels"], batches[0][1])
    # the last label of a row is the first input of the next row: no target is skipped
    assert torch.equal(labels[:-1, -1], inputs[1:, 0])
    assert (inputs == tokenizer.eos_id).any()


def test_resume_is_batch_exact(tokenizer):
    straight = list(itertools.islice(iter(make(tokenizer)), 12))
    first = make(tokenizer)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    resumed = make(tokenizer)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(iter(resumed), 7))
    for (a, la), (b, lb) in zip(straight[5:], rest):
        assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)


def test_ranks_see_disjoint_documents(tokenizer):
    docs = [f"only-in-doc-{i} " * 40 for i in range(6)]
    seen = []
    for rank in range(2):
        loader = make(tokenizer, docs=docs, rank=rank, world=2, infinite=False)
        text = tokenizer.decode(torch.cat([b[0]["input"].flatten() for b in loader]).tolist())
        seen.append({i for i in range(6) if f"only-in-doc-{i}" in text})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_resume_with_other_world_size_is_refused(tokenizer):
    state = make(tokenizer, world=2).state_dict()
    with pytest.raises(ValueError, match="data-parallel"):
        make(tokenizer, world=1).load_state_dict(state)


def test_resume_on_other_corpus_is_refused(tokenizer):
    state = make(tokenizer).state_dict()
    with pytest.raises(ValueError, match="another corpus"):
        make(tokenizer, docs=["a", "b"]).load_state_dict(state)


def test_seed_changes_order(tokenizer):
    a = next(iter(make(tokenizer, seed=0)))[1]
    b = next(iter(make(tokenizer, seed=1)))[1]
    assert not torch.equal(a, b)


def test_ramps_follow_the_optimizer_step_and_resume_exactly(tokenizer):
    from fusion_titan.training.ramp import Ramp

    def ramped():
        return PackedDocumentLoader(
            [f"document {i}: " + "word " * 40 for i in range(20)], str, tokenizer, seq_len=32,
            batch_size=4, dp_rank=0, dp_world_size=1, seq_len_ramp=Ramp((0, 2), (8, 32)),
            batch_ramp=Ramp((0, 3), (1, 4)), microbatches_per_step=2)

    shapes = [tuple(b[1].shape) for b in itertools.islice(iter(ramped()), 10)]
    # 2 micro-batches per step: steps 0-1 at (1, 8), step 2 at (1, 32), steps 3+ at (4, 32)
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


def test_ramp_config_errors_name_the_fix():
    from fusion_titan.training.ramp import Ramp

    with pytest.raises(ValueError, match="seq_len_ramp_steps"):
        Ramp.from_config("seq_len_ramp", [128, 256], [5, 10], default=256)
    with pytest.raises(ValueError, match="2 values but 1 steps"):
        Ramp.from_config("seq_len_ramp", [128, 256], [0], default=256)
    with pytest.raises(ValueError, match="above 256"):
        Ramp.from_config("seq_len_ramp", [128, 512], [0, 10], default=256, maximum=256)
    assert Ramp.from_config("batch_ramp", [], [], default=8)(1000) == 8
    assert Ramp.from_config("seq_len_ramp", [128, 256], [0, 10], default=256)(10) == 256

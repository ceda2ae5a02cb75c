"""The prepared-shard pipeline: prepare (sources, dedup, resume), verification, the shard loader
(mixture, curriculum, rank split, exact resume with prefetch and ramps) and held-out batches."""

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchtitan.config import ConfigManager

from fusion_titan.data import prepare as prepare_mod
from fusion_titan.data import shards as shards_mod
from fusion_titan.data.dataloader import build_dataloader, build_validation_dataloader
from fusion_titan.data.mixture import build_curriculum
from fusion_titan.data.prepare import PrepareParams, prepare
from fusion_titan.data.global_batch import BatchPlan, document_ids
from fusion_titan.data.shard_loader import ShardLoader, SourceStream
from fusion_titan.data.shards import (MANIFEST, append_record, read_manifest, token_dtype,
                                      tokenizer_fingerprint, write_shard)
from fusion_titan.data.tokenizer import TiktokenTokenizer
from fusion_titan.training.ramp import Ramp
from trainer_runs import launch, tb_losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer("qwen2.5")


def words_doc(rng: random.Random, n: int = 100) -> str:
    return " ".join(f"w{rng.randrange(50_000)}" for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """txt dir (3 docs), jsonl (20 unique + 3 exact + 2 near dups), parquet (10 unique + 1 cross-source dup)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (d / "txt").mkdir()
    for i in range(3):
        (d / "txt" / f"doc{i}.txt").write_text(f"Plain text file {i}.\n" + words_doc(rng))
    unique = [f"Jsonl doc {i}: " + words_doc(rng) for i in range(20)]
    exact = [unique[0].upper(), "  " + unique[1].replace(" ", "\n  "), unique[2] + "   "]
    near = []
    for i in (3, 4):
        w = unique[i].split(" ")
        w[50] = "CHANGED"
        near.append(" ".join(w))
    jsonl = unique[:10] + exact + unique[10:] + near
    with open(d / "docs.jsonl", "w") as f:
        for t in jsonl:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    par = [f"Parquet row {i}: " + words_doc(rng) for i in range(10)] + [unique[5]]
    pq.write_table(pa.table({"text": par}), d / "rows.parquet")
    return {"dir": d, "unique": unique, "parquet": par}


def sources(corpus):
    d = corpus["dir"]
    return [("txt", str(d / "txt")), ("web", str(d / "docs.jsonl")), ("rows", str(d / "rows.parquet"))]


def shard_docs(out: Path, source: str, tok, split: str = "train") -> list[str]:
    m = read_manifest(out)
    tokens = np.concatenate([np.fromfile(out / r["file"], dtype=r["dtype"]) for r in m.shards_of(source, split)])
    assert tokens[-1] == tok.eos_id
    cuts = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts, cuts)]


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    stats = prepare(out, sources(corpus), PrepareParams(shard_tokens=1500), workers=2, progress=False)
    return out, stats


# ---- prepare ---------------------------------------------------------------------------------


def test_prepare_packs_local_files_and_dedups(prepared, corpus, tok):
    out, stats = prepared
    assert stats["txt"]["input_documents"] == 3 and stats["txt"]["train_documents"] == 3
    w = stats["web"]
    assert (w["input_documents"], w["exact_duplicates"], w["near_duplicates"], w["train_documents"]) == (25, 3, 2, 20)
    r = stats["rows"]  # the last parquet row repeats a jsonl document: dedup is across sources
    assert (r["input_documents"], r["exact_duplicates"], r["near_duplicates"], r["train_documents"]) == (11, 1, 0, 10)
    # the shards hold exactly the kept documents, in input order, each followed by EOS
    assert shard_docs(out, "web", tok) == corpus["unique"]
    assert shard_docs(out, "rows", tok) == corpus["parquet"][:10]
    m = read_manifest(out)
    assert len(m.shards_of("web")) > 1  # 1500-token shards
    assert m.header["dtype"] == "uint32" and m.header["eos_id"] == tok.eos_id
    for rec in m.shards:
        assert set(rec) >= {"source", "file", "documents", "tokens", "dtype", "sha256"}
    assert sum(r["documents"] for r in m.shards_of("web")) == 20


def test_near_duplicate_of_any_kept_document_in_a_bucket_is_found():
    """LSH buckets remember every kept document (not only the first): Z shares band 0 with X and
    Y, and is a near-duplicate of Y only (estimated Jaccard 0.75), so it must go."""
    from fusion_titan.data.dedup import DedupParams, Deduper

    d = Deduper(DedupParams(exact=False, num_perm=4, bands=2, threshold=0.75))
    sig = lambda *v: np.array(v, dtype=np.uint32)  # noqa: E731
    assert d.keep(None, sig(1, 2, 3, 4))  # X
    assert d.keep(None, sig(1, 2, 7, 8))  # Y: band 0 like X, Jaccard 0.5 -> kept
    assert not d.keep(None, sig(1, 2, 7, 9))  # Z: 0.5 with X, 0.75 with Y
    assert d.keep(None, sig(5, 6, 7, 10))  # unrelated enough: kept
    assert d.near_removed == 1


def test_prepare_cli_and_rerun_is_a_noop(prepared, corpus, tmp_path):
    out, _ = prepared
    before = (out / MANIFEST).read_bytes()
    cmd = [sys.executable, str(ROOT / "scripts/prepare_data.py"), "--out", str(out), "--shard-tokens", "1500",
           "--workers", "2", *[x for n, s in sources(corpus) for x in ("--source", f"{n}={s}")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stderr
    assert "web: 25 documents read, 3 exact and 2 near duplicates removed" in proc.stdout
    assert (out / MANIFEST).read_bytes() == before
    # other parameters on the same directory are refused, naming the manifest
    with pytest.raises(ValueError, match="manifest.jsonl.*other inputs or parameters"):
        prepare(out, sources(corpus), PrepareParams(shard_tokens=999), progress=False)


def test_hf_datasets_streaming_path(corpus, tmp_path, tok):
    """hf:NAME goes through datasets.load_dataset(streaming=True); the json builder needs no network."""
    spec = f"hf:json?data_files={corpus['dir'] / 'docs.jsonl'}"
    stats = prepare(tmp_path, [("web", spec)], PrepareParams(), progress=False)
    assert (stats["web"]["exact_duplicates"], stats["web"]["near_duplicates"]) == (3, 2)
    assert shard_docs(tmp_path, "web", tok) == corpus["unique"]


def test_hf_spec_text_columns_and_software_heritage_contents(tmp_path, monkeypatch):
    """text=COL,COL joins columns (list columns item by item, chat turns by content); swh=COL
    downloads each row's gzip blob from the Software Heritage bucket (here a local HTTP server
    with the same layout), skipping blobs the archive lacks, in the dataset's order."""
    import gzip
    import http.server
    import threading
    from functools import partial

    from fusion_titan.data import sources

    rows = [{"problem": "1+1?", "solution": "2", "messages": [{"role": "user", "content": "1+1?"},
                                                              {"role": "assistant", "content": "<think>2</think> 2"}]},
            {"problem": "2+2?", "solution": "4", "messages": []}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"hf:json?data_files={data}"
    assert list(sources.iter_documents(spec + "&text=problem,solution")) == ["1+1?\n\n2", "2+2?\n\n4"]
    assert list(sources.iter_documents(spec + "&text=messages"))[0] == "1+1?\n\n<think>2</think> 2"
    with pytest.raises(KeyError, match="no 'answer' column"):
        list(sources.iter_documents(spec + "&text=answer"))

    blobs = [f"{i:040x}" for i in range(70)]  # more than the downloads kept in flight
    (tmp_path / "content").mkdir()
    for i, b in enumerate(blobs):
        if i != 3:  # blob 3 is missing from the archive
            (tmp_path / "content" / b).write_bytes(gzip.compress(f"def f{i}(): pass\n".encode()))
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"blob_id": b, "language": "Python"}) + "\n" for b in blobs))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(sources, "SWH_CONTENT_URL", f"http://127.0.0.1:{server.server_port}/content/{{}}")
        docs = list(sources.iter_documents(f"hf:json?data_files={ids}&swh=blob_id"))
    finally:
        server.shutdown()
    assert docs == [f"def f{i}(): pass\n" for i in range(70) if i != 3]


def test_stdlib_is_a_source_and_val_split_is_held_out(tmp_path, tok):
    stats = prepare(tmp_path, [("stdlib", "stdlib")], PrepareParams(max_documents=40, val_fraction=0.2),
                    progress=False)
    s = stats["stdlib"]
    assert s["train_documents"] > 20 and s["val_documents"] > 2
    assert s["train_documents"] + s["val_documents"] + s["exact_duplicates"] + s["near_duplicates"] == 40
    train, val = shard_docs(tmp_path, "stdlib", tok), shard_docs(tmp_path, "stdlib", tok, "val")
    assert not set(train) & set(val)


def _shard_summary(out: Path):
    return [(r["file"], r["sha256"], r["documents"], r["input_end"]) for r in read_manifest(out).shards]


@pytest.mark.parametrize("crash_at", ["rename", "manifest"])
def test_interrupted_run_never_claims_a_partial_shard_and_resumes(prepared, corpus, tmp_path, monkeypatch, crash_at):
    clean, _ = prepared
    class Crash(Exception):
        pass

    def fail_on(real, is_web_shard_1):
        def wrapper(*a, **k):
            if is_web_shard_1(*a):
                raise Crash()
            return real(*a, **k)
        return wrapper

    if crash_at == "rename":  # tmp written, rename never happens
        monkeypatch.setattr(shards_mod.os, "replace", fail_on(os.replace, lambda src, dst: "web/train-00001" in str(dst)))
    else:  # shard renamed into place, its manifest line never written
        monkeypatch.setattr(prepare_mod, "append_record",
                            fail_on(append_record, lambda out, rec: rec.get("file") == "web/train-00001.bin"))
    with pytest.raises(Crash):
        prepare(tmp_path, sources(corpus), PrepareParams(shard_tokens=1500), progress=False)
    monkeypatch.undo()
    m = read_manifest(tmp_path)
    shards_mod.verify_shards(m, m.shards)  # everything claimed is complete
    claimed = {r["file"] for r in m.shards}
    on_disk = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.bin*")}
    assert on_disk - claimed  # the interrupted shard is on disk but not claimed
    # a torn manifest line (crash mid-append) stops the loader, naming the file; prepare repairs it
    with open(tmp_path / MANIFEST, "a") as f:
        f.write('{"kind": "shard", "sou')
    with pytest.raises(ValueError, match=f"{MANIFEST}.*incomplete"):
        read_manifest(tmp_path)
    prepare(tmp_path, sources(corpus), PrepareParams(shard_tokens=1500), progress=False)
    assert _shard_summary(tmp_path) == _shard_summary(clean)


# ---- bad input -------------------------------------------------------------------------------


def job(path, *overrides, config="train_configs/debug_curriculum.toml"):
    return ConfigManager().parse_args(["--job.config_file", str(ROOT / config), "--data.path", str(path),
                                       "--data.stage_weights", "web=1", "--data.stage_steps", "0",
                                       *overrides])


@pytest.fixture
def broken(prepared, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(prepared[0], out)
    return out, read_manifest(out).shards_of("web")[1]["file"]


def test_missing_shard_is_named(broken, tok):
    out, name = broken
    (out / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{name}.*missing"):
        build_dataloader(1, 0, tok, job(out))


def test_checksum_mismatch_is_named(broken, tok):
    out, name = broken
    data = bytearray((out / name).read_bytes())
    data[5] ^= 0xFF
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name}.*sha256"):
        build_dataloader(1, 0, tok, job(out))
    build_dataloader(1, 0, tok, job(out, "--data.no-verify-checksums"))  # opt-out works


def test_truncated_shard_is_named(broken, tok):
    out, name = broken
    with open(out / name, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=f"{name}.*truncated"):
        build_dataloader(1, 0, tok, job(out, "--data.no-verify-checksums"))


@pytest.mark.parametrize("field,value", [("tokenizer_fingerprint", "0123456789abcdef"), ("vocab_size", 50257),
                                         ("eos_id", 50256)])
def test_manifest_for_another_tokenizer_is_refused(broken, tok, field, value):
    out, _ = broken
    lines = (out / MANIFEST).read_text().splitlines()
    header = json.loads(lines[0])
    header[field] = value
    (out / MANIFEST).write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=f"{MANIFEST}: prepared with tokenizer"):
        build_dataloader(1, 0, tok, job(out))


def test_vocab_larger_than_the_model_is_refused(broken, tok):
    out, _ = broken
    lines = (out / MANIFEST).read_text().splitlines()
    header = json.loads(lines[0])
    header["vocab_size"] = 10**6
    (out / MANIFEST).write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=f"{MANIFEST}.*up to vocab 1000000, the model's vocab_size"):
        build_dataloader(1, 0, tok, job(out))


def test_missing_manifest_and_config_errors(tmp_path, prepared, tok):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*prepare_data.py --out {tmp_path} --source stdlib"):
        build_dataloader(1, 0, tok, job(tmp_path))
    out = prepared[0]
    with pytest.raises(ValueError, match="'nope'.*sources are"):
        build_dataloader(1, 0, tok, job(out, "--data.stage_weights", "nope=1"))
    with pytest.raises(ValueError, match="must start at 0 and increase"):
        build_dataloader(1, 0, tok, job(out, "--data.stage_weights", "web=1,rows=1", "--data.stage_steps", "5", "5"))
    with pytest.raises(ValueError, match="2 stage_weights but 1 stage_steps"):
        build_dataloader(1, 0, tok, job(out, "--data.stage_weights", "web=1,rows=1"))
    with pytest.raises(ValueError, match="source=weight"):
        build_dataloader(1, 0, tok, job(out, "--data.stage_weights", "web:1"))


# ---- the loader on synthetic shards ----------------------------------------------------------


def make_prepared(out: Path, tok, streams: dict[str, list[np.ndarray]]) -> Path:
    """A prepared directory written with the library's writer, from token arrays."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.get_vocab_size())
    append_record(out, {"kind": "header", "format": shards_mod.FORMAT, "tokenizer": "qwen2.5",
                        "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_size": tok.get_vocab_size(),
                        "eos_id": tok.eos_id, "dtype": dtype, "sources": [], "params": {}})
    for name, parts in streams.items():
        for split in ("train", "val"):
            for i, part in enumerate(parts):
                rel = f"{name}/{split}-{i:05d}.bin"
                sha = write_shard(out / rel, part.astype(dtype))
                append_record(out, {"kind": "shard", "source": name, "split": split, "file": rel, "documents": 1,
                                    "tokens": len(part), "dtype": dtype, "sha256": sha, "input_end": i + 1})
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tok):
    # token value = position within the source + offset: every row tells where it came from
    a = np.arange(0, 30_000)
    b = np.arange(100_000, 130_000)
    return make_prepared(tmp_path_factory.mktemp("synthetic"), tok,
                         {"a": [a[:10_000], a[10_000:]], "b": [b[:5_000], b[5_000:]]})


def loader(path, tok, weights=("a=1 b=1",), steps=(0,), rank=0, world=1, seq=16, batch=2, mb=1,
           prefetch=2, seq_ramp=None, batch_ramp=None, seed=0, doc_ids=False, infinite=True):
    """`batch` rows per micro-batch per rank; `batch_ramp` in sequences per optimizer step."""
    m = read_manifest(path)
    names = m.sources()
    streams = [SourceStream(n, m, m.shards_of(n), seed) for n in names]
    cur = build_curriculum(list(weights), list(steps), names, {s.name: s.total for s in streams})
    plan = BatchPlan(rank, world, mb, seq_ramp or Ramp.constant(seq),
                     batch_ramp or Ramp.constant(batch * world * mb))
    return ShardLoader(streams, cur, plan, seed=seed, prefetch=prefetch, eos_id=tok.eos_id,
                       document_ids=doc_ids, infinite=infinite)


def take(ld, n):
    return [(x["input"].clone(), y.clone()) for x, y in itertools.islice(iter(ld), n)]


def test_rows_are_contiguous_and_labels_shifted(synthetic, tok):
    (x, y), = take(loader(synthetic, tok, weights=["a=1"]), 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(x[1], torch.arange(16, 32))  # chained rows


def test_mixture_weights_are_respected(synthetic, tok):
    rows = torch.cat([x for x, _ in take(loader(synthetic, tok, weights=["a=3 b=1"], batch=8), 500)])
    frac_a = (rows[:, 0] < 100_000).float().mean().item()
    assert abs(frac_a - 0.75) < 0.025, frac_a  # 4000 rows: 3 sigma is 0.021


def test_curriculum_switches_at_the_step(synthetic, tok):
    batches = take(loader(synthetic, tok, weights=["a=1", "b=1"], steps=[0, 3], mb=2), 12)
    src = ["a" if (x < 100_000).all() else "b" if (x >= 100_000).all() else "mixed" for x, _ in batches]
    assert src == ["a"] * 6 + ["b"] * 6  # 2 micro-batches per step: steps 1-3 from a, then b


def test_shards_wrap_around_in_a_seeded_order(synthetic, tok):
    ld = loader(synthetic, tok, weights=["b=1"], seq=1000, batch=1)
    rows = torch.cat([x for x, _ in take(ld, 40)])  # 40k tokens of a 30k-token source
    assert torch.equal(rows[:30].flatten(), torch.arange(100_000, 130_000))
    assert set(rows.flatten().tolist()) <= set(range(100_000, 130_000))
    finite = loader(synthetic, tok, weights=["b=1"], seq=1000, batch=1, infinite=False)
    assert len(take(finite, 100)) == 29  # stops before the source would repeat


def test_ranks_split_the_global_batch(synthetic, tok):
    r0 = take(loader(synthetic, tok, rank=0, world=2), 6)
    r1 = take(loader(synthetic, tok, rank=1, world=2), 6)
    one = take(loader(synthetic, tok, world=1, batch=4), 6)
    for (a, _), (b, _), (c, _) in zip(r0, r1, one):
        assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())
        assert torch.equal(torch.cat([a, b]), c)  # same global rows, split by rank


def _resume_check(make, consumed, total):
    straight = take(make(), total)
    first = make()
    it = iter(first)
    for _ in range(consumed):
        next(it)
    state = first.state_dict()  # with prefetch, the thread is ahead of the consumer by now
    del it
    resumed = make()
    resumed.load_state_dict(state)
    again = take(resumed, total - consumed)
    for (a, la), (b, lb) in zip(straight[consumed:], again):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("prefetch", [0, 4])
def test_resume_is_batch_exact_with_prefetch_ramps_and_stages(synthetic, tok, prefetch):
    def make():
        return loader(synthetic, tok, weights=["a=3 b=1", "a=1 b=3"], steps=[0, 4], mb=2, prefetch=prefetch,
                      seq_ramp=Ramp((0, 2), (8, 16)), batch_ramp=Ramp((0, 3), (2, 6)))

    shapes = [tuple(y.shape) for _, y in take(make(), 8)]
    assert shapes == [(1, 8)] * 4 + [(1, 16)] * 2 + [(3, 16)] * 2
    _resume_check(make, consumed=5, total=14)
    _resume_check(make, consumed=1, total=4)


def test_resume_on_another_number_of_ranks(synthetic, tok):
    world2 = [take(loader(synthetic, tok, rank=r, world=2), 8) for r in range(2)]
    first = loader(synthetic, tok, rank=0, world=2)
    take(first, 3)
    resumed = loader(synthetic, tok, world=1, batch=4)  # same global batch on one rank
    resumed.load_state_dict(first.state_dict())
    for i, (x, _) in enumerate(take(resumed, 5), start=3):
        assert torch.equal(x, torch.cat([world2[0][i][0], world2[1][i][0]]))
    # a position saved mid-step cannot be moved to another rank count
    mid = loader(synthetic, tok, rank=0, world=2, mb=2)
    take(mid, 3)
    with pytest.raises(ValueError, match="middle of optimizer step"):
        loader(synthetic, tok, world=1, batch=4, mb=2).load_state_dict(mid.state_dict())


def test_resume_on_other_data_is_refused(synthetic, tok, prepared):
    state = loader(synthetic, tok).state_dict()
    with pytest.raises(ValueError, match="other data or another seed"):
        loader(synthetic, tok, seed=1).load_state_dict(state)


def test_document_ids(tok):
    eos = tok.eos_id
    x = torch.tensor([[5, eos, 6, 7, eos, eos, 8]])
    assert document_ids(x, eos).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_document_ids_flag(synthetic, tok, prepared):
    (x, _), = [(b[0], b[1]) for b in itertools.islice(iter(loader(synthetic, tok, doc_ids=True)), 1)]
    assert torch.equal(x["document_ids"], document_ids(x["input"], tok.eos_id))
    # through the TOML flag too; the model takes the key as intra-document masking
    # (tests/test_document_masking.py checks what it does with it)
    built = build_dataloader(1, 0, tok, job(prepared[0], "--data.document-ids"))
    (x, _), = itertools.islice(iter(built), 1)
    assert set(x) == {"input", "labels", "document_ids"}


# ---- validation ------------------------------------------------------------------------------


def test_validation_batches_are_finite_deterministic_and_rank_disjoint(synthetic, tok):
    def val(rank, world):
        cfg = job(synthetic, "--validation.seq_len", "64", "--validation.local_batch_size", "4")
        return list(build_validation_dataloader(world, rank, tok, cfg))

    one, again = val(0, 1), val(0, 1)
    assert len(one) == 60000 // 64 // 4 and all(torch.equal(a[1], b[1]) for a, b in zip(one, again))
    r0, r1 = val(0, 2), val(1, 2)
    assert len(r0) == len(r1) > 0
    assert not {x[0]["input"][i, 0].item() for x in r0 for i in range(4)} & {
        x[0]["input"][i, 0].item() for x in r1 for i in range(4)}


# ---- end to end ------------------------------------------------------------------------------


CURRICULUM = "train_configs/debug_curriculum.toml"


@pytest.fixture(scope="module")
def prepared_for_training(tmp_path_factory):
    data = tmp_path_factory.mktemp("prepared") / "data"
    subprocess.run([sys.executable, "scripts/prepare_data.py", "--quiet", "--out", str(data), "--source", "stdlib",
                    "--source", "docs=docs", "--max-documents", "60", "--val-fraction", "0.05"],
                   cwd=ROOT, check=True, timeout=600)
    return data


@pytest.mark.slow
def test_two_ranks_train_from_shards_and_resume_bit_exactly(tmp_path, prepared_for_training):
    """2 CPU processes (FSDP over gloo) read disjoint rows of the shards; the loader position,
    saved once for both ranks, brings a resumed 2-process run back onto the same batches."""
    def run(dump):
        log = launch(dump, "--checkpoint.keep_latest_k", "0", "--training.steps", "4",
                     "--checkpoint.interval", "2", "--training.seq_len", "64",
                     "--data.path", str(prepared_for_training), "--data.stage_steps", "0", "2",
                     nproc=2, config=CURRICULUM, timeout=1200)
        return log, tb_losses(dump)

    _, losses = run(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4]
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    log, again = run(resumed)
    assert "Training starts at step 3" in log
    assert [again[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]


@pytest.mark.slow
def test_run_train_from_shards_with_curriculum_resumes_bit_exactly(tmp_path, prepared_for_training):
    """prepare_data.py -> run_train.sh on debug_curriculum.toml (two stages, switching at step 4,
    intra-document masking on), 8 steps with a checkpoint at 4; a resume from step 4 reproduces
    steps 5-8 bit for bit."""
    def run(dump):
        log = launch(dump, "--checkpoint.keep_latest_k", "0", "--training.steps", "8",
                     "--checkpoint.interval", "4", "--data.path", str(prepared_for_training),
                     "--data.stage_steps", "0", "4",
                     "--data.document-ids",  # intra-document masking end to end
                     config=CURRICULUM, timeout=1200)
        return log, tb_losses(dump)

    log, losses = run(tmp_path / "run")
    assert sorted(losses) == list(range(1, 9))
    assert "stages at steps [0, 4]" in log
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoint" / "step-4", resumed / "checkpoint" / "step-4")
    log, again = run(resumed)
    assert "Training starts at step 5" in log
    assert [again[s] for s in range(5, 9)] == [losses[s] for s in range(5, 9)]


# ---- fusion_7b's data ------------------------------------------------------------------------


FUSION_7B = ROOT / "train_configs/fusion_7b.toml"


def test_fusion_7b_without_its_shards_stops_naming_the_prepare_command(tmp_path, tok):
    missing = tmp_path / "not-prepared"
    cfg = ConfigManager().parse_args(["--job.config_file", str(FUSION_7B), "--data.path", str(missing)])
    with pytest.raises(FileNotFoundError) as err:
        build_dataloader(8, 0, tok, cfg)
    message = str(err.value)
    assert f"python scripts/prepare_data.py --out {missing} --source fineweb_edu=" in message
    for name in ("finemath", "stack_edu", "cosmopedia", "openr1_math"):
        assert f"--source {name}=\"hf:" in message
    assert "never falls back" in message and not missing.exists()


def test_the_documented_prepare_command_is_the_configs():
    """README and docs/data.md print fusion_7b's prepare command exactly as its TOML header does."""
    from fusion_titan.data.dataloader import prepare_command

    command = prepare_command(str(FUSION_7B))
    assert command.count("--source") == 5 and "hf:HuggingFaceTB/stack-edu?name=Python&swh=blob_id" in command
    for doc in ("README.md", "docs/data.md"):
        text = (ROOT / doc).read_text().replace("\\\n", " ")
        assert command in " ".join(text.split()), f"{doc} does not show {command}"


@pytest.mark.slow
def test_run_train_on_fusion_7b_without_shards_fails_at_start(tmp_path):
    """The real trainer stops before building the model, with the one message."""
    missing = tmp_path / "data"
    log = launch(tmp_path / "run", "--data.path", str(missing), config="train_configs/fusion_7b.toml",
                 timeout=600, expect_ok=False)
    assert f"python scripts/prepare_data.py --out {missing}" in log
    assert "Building fusion fusion_7b" not in log  # the model is never built

"""The prepare pipeline behind scripts/prepare_data.py: read -> dedup -> tokenize -> pack -> shards.

Worker processes compute, per document, the dedup keys, the train/val split and the tokens (with
EOS); the main process keeps results in input order, asks the `Deduper`, and packs kept documents
into per-(source, split) shards of about `shard_tokens` tokens (a document never spans shards).

Resume: a shard line in the manifest records `input_end`, the number of the source's input
documents it covers for its split. A rerun streams every source again (the dedup index must see
the same documents in the same order), but only tokenizes and writes documents past the
committed `input_end` of their split. A directory whose sources are all `source_done` is a no-op.
"""

from __future__ import annotations

import collections
import multiprocessing
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .dedup import DedupParams, Deduper, exact_key, minhash, normalize
from .shards import (FORMAT, MANIFEST, append_record, read_manifest, token_dtype,
                     tokenizer_fingerprint, write_shard)
from .sources import iter_documents
from .tokenizer import TiktokenTokenizer

_CHUNK_DOCS = 64  # documents per worker task: amortizes inter-process transfer


@dataclass
class PrepareParams:
    tokenizer: str = "qwen2.5"
    shard_tokens: int = 1 << 26
    val_fraction: float = 0.0
    text_field: str = "text"
    txt_separator: str = ""
    max_documents: int = 0  # per source, 0 = all
    dedup: DedupParams = field(default_factory=DedupParams)


class Progress:
    """One self-overwriting stderr line: documents and tokens, totals and rates."""

    def __init__(self, enabled: bool = True, every: float = 0.5):
        self.enabled, self.every = enabled, every
        self.start = self.last = time.perf_counter()
        self.docs = self.tokens = 0
        self.label = ""

    def update(self, docs: int = 0, tokens: int = 0, force: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            dt = max(now - self.start, 1e-9)
            sys.stderr.write(f"\r[{self.label}] {self.docs:,} docs ({self.docs / dt:,.0f} docs/s)  "
                             f"{self.tokens:,} tokens ({self.tokens / dt:,.0f} tokens/s)   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")


# ---- worker side -----------------------------------------------------------------------------

_W: dict = {}


def _init_worker(params: PrepareParams) -> None:
    tok = TiktokenTokenizer(params.tokenizer)
    _W.update(params=params, tok=tok, dtype=np.dtype(token_dtype(tok.get_vocab_size())))


def _work(task: tuple[list[tuple[int, str]], dict[str, int]]) -> list[tuple]:
    docs, resume_from = task
    p: PrepareParams = _W["params"]
    out = []
    for index, text in docs:
        norm = normalize(text)
        key = exact_key(norm, p.dedup.prefix_chars) if p.dedup.exact else None
        sig = minhash(norm, p.dedup) if p.dedup.near else None
        # split by content, not position: stable when sources are reordered or extended
        val = p.val_fraction > 0 and zlib.crc32(norm.encode("utf-8")) % 1_000_000 < p.val_fraction * 1e6
        split = "val" if val else "train"
        tokens = None
        if index >= resume_from.get(split, 0):
            tokens = np.array(_W["tok"].encode(text, add_eos=True), dtype=_W["dtype"])
        out.append((index, key, sig, split, tokens))
    return out


def _results(tasks: Iterable, workers: int, params: PrepareParams) -> Iterator[list[tuple]]:
    """Worker results in task order, with a bounded number of tasks in flight."""
    if workers <= 1:
        _init_worker(params)
        yield from map(_work, tasks)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(params,)) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- main side -------------------------------------------------------------------------------


class _Packer:
    """Accumulates one (source, split)'s kept documents and commits full shards."""

    def __init__(self, out: Path, source: str, split: str, dtype: str, shard_tokens: int, first_index: int):
        self.out, self.source, self.split, self.dtype = out, source, split, dtype
        self.shard_tokens, self.index = shard_tokens, first_index
        self.parts: list[np.ndarray] = []
        self.tokens = 0
        self.written_tokens = 0

    def add(self, tokens: np.ndarray, input_end: int) -> None:
        self.parts.append(tokens)
        self.tokens += len(tokens)
        if self.tokens >= self.shard_tokens:
            self.flush(input_end)

    def flush(self, input_end: int) -> None:
        if not self.parts:
            return
        rel = f"{self.source}/{self.split}-{self.index:05d}.bin"
        sha = write_shard(self.out / rel, np.concatenate(self.parts))
        append_record(self.out, {"kind": "shard", "source": self.source, "split": self.split, "file": rel,
                                 "documents": len(self.parts), "tokens": self.tokens, "dtype": self.dtype,
                                 "sha256": sha, "input_end": input_end})
        self.index += 1
        self.written_tokens += self.tokens
        self.parts, self.tokens = [], 0


def _header(params: PrepareParams, sources: list[tuple[str, str]], tok: TiktokenTokenizer) -> dict:
    return {"kind": "header", "format": FORMAT, "tokenizer": params.tokenizer,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_size": tok.get_vocab_size(),
            "eos_id": tok.eos_id, "dtype": token_dtype(tok.get_vocab_size()),
            "sources": [[n, s] for n, s in sources], "params": asdict(params)}


def prepare(out: str | Path, sources: list[tuple[str, str]], params: PrepareParams | None = None,
            workers: int = 1, progress: bool = True) -> dict[str, dict]:
    """Build (or finish) a prepared directory; returns the per-source stats records."""
    params = params or PrepareParams()
    params.dedup.validate()
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique: {names}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = TiktokenTokenizer(params.tokenizer)
    header = _header(params, sources, tok)
    if (out / MANIFEST).is_file() and b"\n" not in (out / MANIFEST).read_bytes():
        (out / MANIFEST).unlink()  # a crash while writing the header: nothing was claimed yet
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out, repair_torn_tail=True)
        old = {k: v for k, v in manifest.header.items() if k != "created"}
        if old != header:
            diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
            raise ValueError(f"{manifest.path} was prepared with other inputs or parameters "
                             f"(differs in {diff}); use another --out, or delete the directory")
        if all(n in manifest.done for n in names):
            if progress:
                print(f"{out}: every source is already prepared; nothing to do", file=sys.stderr)
            return {n: manifest.done[n] for n in names}
    else:
        append_record(out, header)
        manifest = read_manifest(out)

    dtype = header["dtype"]
    deduper = Deduper(params.dedup)
    bar = Progress(progress)
    stats: dict[str, dict] = {}
    for name, spec in sources:
        done = manifest.done.get(name)
        resume_from: dict[str, int] = {}
        packers = {}
        for split in ("train", "val"):
            claimed = manifest.shards_of(name, split)
            # a finished source needs only its dedup keys: nothing of it is tokenized again
            resume_from[split] = (1 << 62) if done else (claimed[-1]["input_end"] if claimed else 0)
            packers[split] = _Packer(out, name, split, dtype, params.shard_tokens, len(claimed))
        bar.label = name
        docs = iter_documents(spec, params.text_field, params.txt_separator)
        if params.max_documents > 0:
            docs = islice(docs, params.max_documents)
        tasks = _tasks(enumerate(docs), resume_from)
        exact0, near0 = deduper.exact_removed, deduper.near_removed
        n_input, kept = 0, {"train": 0, "val": 0}
        for results in _results(tasks, workers, params):
            new_tokens = 0
            for index, key, sig, split, tokens in results:
                n_input = index + 1
                if not deduper.keep(key, sig):
                    continue
                kept[split] += 1
                if tokens is not None:
                    new_tokens += len(tokens)
                    packers[split].add(tokens, input_end=index + 1)
            bar.update(len(results), new_tokens)
        if done:
            stats[name] = done
            continue
        for packer in packers.values():
            packer.flush(input_end=n_input)
        record = {"kind": "source_done", "source": name, "spec": spec, "input_documents": n_input,
                  "exact_duplicates": deduper.exact_removed - exact0,
                  "near_duplicates": deduper.near_removed - near0,
                  "train_documents": kept["train"], "val_documents": kept["val"],
                  "tokens": sum(r["tokens"] for r in read_manifest(out).shards_of(name, "train")),
                  "val_tokens": sum(r["tokens"] for r in read_manifest(out).shards_of(name, "val"))}
        append_record(out, record)
        stats[name] = record
    bar.close()
    return stats


def _tasks(docs: Iterable[tuple[int, str]], resume_from: dict[str, int]) -> Iterator[tuple]:
    while chunk := list(islice(docs, _CHUNK_DOCS)):
        yield chunk, resume_from

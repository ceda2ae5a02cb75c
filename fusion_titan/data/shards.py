"""Token shards on disk: the `.bin` files, their `manifest.jsonl`, atomic writes and verification.

A prepared directory holds `<source>/<split>-NNNNN.bin` files (raw little-endian token ids, one
fixed dtype, documents each followed by EOS) and `manifest.jsonl`:

    {"kind": "header", "format": 1, "tokenizer": ..., "tokenizer_fingerprint": ..., "vocab_size": ...,
     "eos_id": ..., "dtype": ..., "params": {...prepare parameters...}}
    {"kind": "shard", "source": ..., "split": "train"|"val", "file": ..., "documents": ..., "tokens": ...,
     "dtype": ..., "sha256": ..., "input_end": ...}
    {"kind": "source_done", "source": ..., "input_documents": ..., "exact_duplicates": ..., ...}

A shard is written to a temporary name, fsynced and renamed before its manifest line is appended
(and fsynced), so a crash never leaves a line that claims a missing or partial file; files the
manifest does not name are leftovers and get overwritten by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.jsonl"
FORMAT = 1
# Fixed texts whose token ids identify a BPE beyond its vocabulary size.
_PROBES = ["Hello world", "def f(x):\n    return x ** 2\n", "Grüße, 世界! 12345 ...", "  \t\n"]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_fingerprint(tokenizer) -> str:
    ids = [tokenizer.encode(t) for t in _PROBES]
    blob = json.dumps([tokenizer.get_vocab_size(), tokenizer.eos_id, ids]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Atomically write tokens to path (tmp + fsync + rename); returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(tokens).astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def append_record(directory: Path, record: dict) -> None:
    """One manifest line, fsynced: the commit point of the shard it names."""
    with open(directory / MANIFEST, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Manifest:
    directory: Path
    header: dict
    shards: list[dict] = field(default_factory=list)
    done: dict[str, dict] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST

    def sources(self, split: str = "train") -> list[str]:
        """Names of the sources with shards of this split, in first-appearance order."""
        names: list[str] = []
        for s in self.shards:
            if s["split"] == split and s["source"] not in names:
                names.append(s["source"])
        return names

    def shards_of(self, source: str, split: str = "train") -> list[dict]:
        return [s for s in self.shards if s["source"] == source and s["split"] == split]


def read_manifest(directory: str | Path, repair_torn_tail: bool = False) -> Manifest:
    """Parse manifest.jsonl. A last line without newline is a write cut short by a crash:
    prepare (repair_torn_tail) drops it; the loader refuses the directory."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; prepare the directory with scripts/prepare_data.py --out {directory}"
        )
    raw = path.read_text(encoding="utf-8")
    if raw and not raw.endswith("\n"):
        if not repair_torn_tail:
            raise ValueError(f"{path}: the last line is incomplete (an interrupted prepare run); "
                             "re-run scripts/prepare_data.py on this directory to finish it")
        raw = raw[: raw.rfind("\n") + 1]
        with open(path, "w", encoding="utf-8") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    header, shards, done = None, [], {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        try:
            record = json.loads(line)
            kind = record["kind"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: not a manifest record ({e}); the file is damaged, "
                             "prepare the directory again") from None
        if kind == "header":
            header = record
        elif kind == "shard":
            shards.append(record)
        elif kind == "source_done":
            done[record["source"]] = record
    if header is None:
        raise ValueError(f"{path}: no header record; prepare the directory again")
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: manifest format {header.get('format')}, this code reads {FORMAT}")
    return Manifest(directory, header, shards, done)


def check_tokenizer(manifest: Manifest, tokenizer) -> None:
    h = manifest.header
    mine = (tokenizer_fingerprint(tokenizer), tokenizer.get_vocab_size(), tokenizer.eos_id)
    theirs = (h.get("tokenizer_fingerprint"), h.get("vocab_size"), h.get("eos_id"))
    if mine != theirs:
        raise ValueError(
            f"{manifest.path}: prepared with tokenizer {h.get('tokenizer')!r} (vocab {h.get('vocab_size')}, "
            f"eos {h.get('eos_id')}, fingerprint {h.get('tokenizer_fingerprint')}), but this run uses "
            f"{getattr(tokenizer, 'name', '?')!r} (vocab {mine[1]}, eos {mine[2]}, fingerprint {mine[0]}); "
            "set [data] tokenizer to the one the shards were made with, or prepare them again"
        )


def verify_shards(manifest: Manifest, records: list[dict], checksums: bool = True) -> None:
    """Every claimed shard exists, has tokens * itemsize bytes and (checksums) its sha256."""
    for r in records:
        path = manifest.directory / r["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard named in {manifest.path} is missing")
        want = r["tokens"] * np.dtype(r["dtype"]).itemsize
        size = path.stat().st_size
        if size != want:
            raise ValueError(f"{path}: {size} bytes, but {manifest.path} claims {r['tokens']} "
                             f"{r['dtype']} tokens ({want} bytes): the file is truncated or damaged; "
                             "prepare the data again")
        if checksums and sha256_file(path) != r["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {manifest.path}: the file is damaged; "
                             "prepare the data again (or set [data] verify_checksums = false to "
                             "skip this check at your own risk)")

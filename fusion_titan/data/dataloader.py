"""TrainSpec.build_dataloader_fn and the validation loader: which row source a run reads.

`[data] source = "stdlib"` (the default): the Python standard library's sources packed on the fly
(packed_documents.py), minus a held-out tenth (stdlib_corpus.stdlib_split) that only validation
reads. `source = "shards"`: a directory prepared by scripts/prepare_data.py (shard_loader.py,
docs/data.md). Both are one global row stream per run, each data-parallel rank taking its slice
of every optimizer step (global_batch.py), so the tokens of a step do not depend on the number
of ranks, and the ramps of `[training]` shape every step.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from torchtitan.tools.logging import logger

from .global_batch import batch_plan
from .held_out import HeldOutLoader
from .mixture import build_curriculum
from .shard_loader import ShardLoader, SourceStream
from .shards import MANIFEST, Manifest, check_tokenizer, read_manifest, verify_shards


def prepare_command(config_file: str) -> str | None:
    """The `python scripts/prepare_data.py ...` command in a TOML's header comment, if any
    (continuation lines included): what a missing data directory's error names."""
    try:
        lines = Path(config_file).read_text().splitlines()
    except (OSError, TypeError):
        return None
    command: list[str] = []
    for line in lines:
        text = line.lstrip("#").strip()
        if command or text.startswith("python scripts/prepare_data.py"):
            command.append(text.rstrip("\\").strip())
            if not text.endswith("\\"):
                break
    return " ".join(command) or None


def _missing_data_error(path: str, job_config) -> FileNotFoundError:
    config_file = getattr(getattr(job_config, "job", None), "config_file", None)
    command = prepare_command(config_file) if config_file else None
    if command:  # the directory this run reads (a CLI override of [data] path included)
        command = re.sub(r"--out \S+", f"--out {path}", command)
    if command:
        how = f"prepare it first with the command of {config_file}: {command}"
        if "--max-documents" not in command:
            how += " (add --max-documents N for a small sample)"
    else:
        how = (f"prepare it first: python scripts/prepare_data.py --out {path} --source NAME=SPEC ... "
               "(docs/data.md)")
    return FileNotFoundError(f"[data] path = {path!r} holds no prepared data (no {MANIFEST}); {how}. "
                             "Training never falls back to another corpus.")


def open_prepared(path: str, tokenizer, checksums: bool, split: str, job_config=None) -> Manifest:
    """Read and verify a prepared directory before training starts (errors name the file)."""
    if not path:
        raise ValueError("[data] source = 'shards' needs [data] path: a directory made by "
                         "scripts/prepare_data.py")
    if not (Path(path) / MANIFEST).is_file():
        raise _missing_data_error(path, job_config)
    manifest = read_manifest(path)
    if job_config is not None:
        from ..model.flavors import FLAVORS

        model_vocab = FLAVORS[job_config.model.flavor].vocab_size
        if manifest.header["vocab_size"] > model_vocab:
            raise ValueError(f"{manifest.path}: tokens go up to vocab {manifest.header['vocab_size']}, "
                             f"the model's vocab_size is {model_vocab} ([model] flavor "
                             f"{job_config.model.flavor!r}); use the model's tokenizer")
    check_tokenizer(manifest, tokenizer)
    records = [r for r in manifest.shards if r["split"] == split]
    if not records:
        raise ValueError(f"{manifest.path}: no {split!r} shards"
                         + (" (prepare with --val-fraction > 0)" if split == "val" else ""))
    verify_shards(manifest, records, checksums=checksums)
    return manifest


def build_shard_loader(plan, tokenizer, job_config, infinite: bool = True) -> ShardLoader:
    data = job_config.data
    manifest = open_prepared(data.path, tokenizer, data.verify_checksums, "train", job_config)
    names = manifest.sources("train")
    streams = [SourceStream(n, manifest, manifest.shards_of(n, "train"), data.seed) for n in names]
    curriculum = build_curriculum(list(data.stage_weights), list(data.stage_steps), names,
                                  {s.name: s.total for s in streams})
    logger.info(f"data: {manifest.directory}: sources {names}, stages at steps "
                f"{list(curriculum.steps)} with weights {[list(w) for w in curriculum.weights]}")
    return ShardLoader(streams, curriculum, plan, seed=data.seed, prefetch=data.prefetch,
                       infinite=infinite, eos_id=tokenizer.eos_id, document_ids=data.document_ids)


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = True):
    """TrainSpec.build_dataloader_fn."""
    data = job_config.data
    plan = batch_plan(job_config, dp_world_size, dp_rank)
    if data.source == "shards":
        return build_shard_loader(plan, tokenizer, job_config, infinite)
    if data.source != "stdlib":
        raise ValueError(f"[data] source = {data.source!r}: use 'stdlib' or 'shards' (with [data] path)")
    from .packed_documents import PackedDocumentLoader
    from .stdlib_corpus import read_document, stdlib_files, stdlib_split

    documents, _ = stdlib_split(stdlib_files())
    if data.max_documents > 0:
        documents = documents[: data.max_documents]
    return PackedDocumentLoader(documents, read_document, tokenizer, plan, seed=data.seed,
                                infinite=infinite, prefetch=data.prefetch,
                                document_ids=data.document_ids)


def build_validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config,
                                infinite: bool = False) -> HeldOutLoader:
    """Held-out batches for validation: finite (unless infinite) and the same on every call.

    source = "shards": the "val" shards of [data] val_path (default: [data] path).
    source = "stdlib": the held-out tenth of the stdlib (stdlib_split), which training never reads.
    Shapes come from [validation] local_batch_size and seq_len."""
    data, val = job_config.data, job_config.validation
    if data.source == "shards" or data.val_path:
        path = data.val_path or data.path
        manifest = open_prepared(path, tokenizer, data.verify_checksums, "val", job_config)
        streams = [np.memmap(manifest.directory / r["file"], dtype=r["dtype"], mode="r")
                   for n in manifest.sources("val") for r in manifest.shards_of(n, "val")]
        name = str(manifest.path)
    elif data.source == "stdlib":
        from .stdlib_corpus import read_document, stdlib_files, stdlib_split

        _, held_out = stdlib_split(stdlib_files())
        ids = [t for d in held_out for t in tokenizer.encode(read_document(d), add_eos=True)]
        streams, name = [np.array(ids, dtype=np.int64)], "the stdlib's held-out files"
    else:
        raise ValueError(f"[data] source = {data.source!r}: no held-out data for it")
    return HeldOutLoader(streams, val.seq_len, val.local_batch_size, dp_rank, dp_world_size,
                         infinite=infinite, source_name=name)

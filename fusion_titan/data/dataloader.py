"""TrainSpec.build_dataloader_fn and the validation loader; the stdlib on-the-fly loader.

`[data] source = "shards"` reads a prepared directory (shard_loader.py, docs/data.md);
`source = "stdlib"` (the default) is PackedDocumentLoader below:
packed next-token batches from a document stream, with exact, checkpointable position.

Documents are tokenized in a seeded order, joined with EOS, and cut into rows of seq_len + 1
tokens (input = row[:-1], labels = row[1:]). Each data-parallel rank owns the documents whose
index is congruent to its rank. The state saved in the DCP checkpoint (epoch, next document,
the tokens left over in the packing buffer, the number of batches served) is all a resumed run
needs to produce exactly the batches the uninterrupted run would have produced.

Batch-size and sequence-length ramps (fusion_titan/training/ramp.py) are applied here: the shape
of each batch follows the optimizer step it belongs to (batches served // micro-batches per step).
"""

from __future__ import annotations

import pickle
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch

from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools.logging import logger

from ..training.ramp import Ramp
from .mixture import build_curriculum
from .shard_loader import HeldOutLoader, ShardLoader, SourceStream
from .shards import Manifest, check_tokenizer, read_manifest, verify_shards


class PackedDocumentLoader(BaseDataLoader):
    def __init__(self, documents: list, read: Callable[[Any], str], tokenizer, seq_len: int,
                 batch_size: int, dp_rank: int, dp_world_size: int, seed: int = 0,
                 infinite: bool = True, seq_len_ramp: Ramp | None = None,
                 batch_ramp: Ramp | None = None, microbatches_per_step: int = 1):
        if not documents:
            raise ValueError("the data source has no documents")
        self.documents = documents
        self.read = read
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.infinite = infinite
        self.seq_len_ramp = seq_len_ramp or Ramp.constant(seq_len)
        self.batch_ramp = batch_ramp or Ramp.constant(batch_size)
        self.microbatches_per_step = microbatches_per_step
        self.batches = 0  # batches served so far
        self._state_key = f"dp_rank_{dp_rank}"
        self.epoch = 0
        self.cursor = 0  # index into this rank's document order
        self.buffer: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.documents)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.dp_rank :: self.dp_world_size]

    def _next_document_tokens(self) -> list[int] | None:
        order = self._order(self.epoch)
        while self.cursor >= len(order):
            if not self.infinite:
                return None
            self.epoch += 1
            self.cursor = 0
            order = self._order(self.epoch)
            logger.info(f"data: rank {self.dp_rank} starts epoch {self.epoch}")
        doc = self.documents[order[self.cursor]]
        self.cursor += 1
        return self.tokenizer.encode(self.read(doc), add_eos=True)

    def _next_row(self, seq_len: int) -> list[int] | None:
        need = seq_len + 1
        while len(self.buffer) < need:
            tokens = self._next_document_tokens()
            if tokens is None:
                return None
            self.buffer.extend(tokens)
        row = self.buffer[:need]
        # The last token of a row is the first input of the next one: no target is skipped.
        self.buffer = self.buffer[need - 1 :]
        return row

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            steps_taken = self.batches // self.microbatches_per_step
            seq_len, n_rows = self.seq_len_ramp(steps_taken), self.batch_ramp(steps_taken)
            rows = []
            for _ in range(n_rows):
                row = self._next_row(seq_len)
                if row is None:
                    return
                rows.append(row)
            self.batches += 1
            batch = torch.tensor(rows, dtype=torch.long)
            inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            # labels also ride in the input dict: the model fuses head + loss (see model.py).
            yield {"input": inputs, "labels": labels}, labels

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer),
                 "batches": self.batches, "seed": self.seed, "n_documents": len(self.documents)}
        return {self._state_key: pickle.dumps(state), "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        saved_world = state_dict.get("world_size")
        if saved_world != self.dp_world_size:
            raise ValueError(
                f"the checkpoint's data position was saved with {saved_world} data-parallel ranks, "
                f"this run has {self.dp_world_size}; resume with the same data-parallel degree "
                "(or start the data from scratch with [checkpoint] exclude_from_loading = ['dataloader'])"
            )
        if self._state_key not in state_dict:
            raise KeyError(f"the checkpoint has no data position for {self._state_key}")
        state = pickle.loads(state_dict[self._state_key])
        if state["n_documents"] != len(self.documents) or state["seed"] != self.seed:
            raise ValueError(
                "the checkpoint's data position belongs to another corpus or seed "
                f"({state['n_documents']} documents, seed {state['seed']}; now "
                f"{len(self.documents)} documents, seed {self.seed})"
            )
        self.epoch, self.cursor, self.buffer = state["epoch"], state["cursor"], list(state["buffer"])
        self.batches = state["batches"]


def _ramps(job_config, dp_world_size: int) -> tuple[Ramp, Ramp, int]:
    training = job_config.training
    global_batch = training.global_batch_size
    if global_batch < 0:
        global_batch = training.local_batch_size * dp_world_size
    microbatches = max(1, global_batch // (training.local_batch_size * dp_world_size))
    seq_len_ramp = Ramp.from_config("seq_len_ramp", getattr(training, "seq_len_ramp", None),
                                    getattr(training, "seq_len_ramp_steps", None),
                                    default=training.seq_len, maximum=training.seq_len)
    batch_ramp = Ramp.from_config("batch_ramp", getattr(training, "batch_ramp", None),
                                  getattr(training, "batch_ramp_steps", None),
                                  default=training.local_batch_size)
    return seq_len_ramp, batch_ramp, microbatches


def open_prepared(path: str, tokenizer, checksums: bool, split: str, job_config=None) -> Manifest:
    """Read and verify a prepared directory before training starts (errors name the file)."""
    if not path:
        raise ValueError("[data] source = 'shards' needs [data] path: a directory made by "
                         "scripts/prepare_data.py")
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


def build_shard_loader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = True):
    data = job_config.data
    manifest = open_prepared(data.path, tokenizer, data.verify_checksums, "train", job_config)
    names = manifest.sources("train")
    streams = [SourceStream(n, manifest, manifest.shards_of(n, "train"), data.seed) for n in names]
    curriculum = build_curriculum(list(data.stage_weights), list(data.stage_steps), names,
                                  {s.name: s.total for s in streams})
    seq_len_ramp, batch_ramp, microbatches = _ramps(job_config, dp_world_size)
    logger.info(f"data: {manifest.directory}: sources {names}, stages at steps "
                f"{list(curriculum.steps)} with weights {[list(w) for w in curriculum.weights]}")
    return ShardLoader(streams, curriculum, dp_rank, dp_world_size, seq_len_ramp, batch_ramp,
                       microbatches_per_step=microbatches, seed=data.seed, prefetch=data.prefetch,
                       infinite=infinite, eos_id=tokenizer.eos_id, document_ids=data.document_ids)


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = True):
    """TrainSpec.build_dataloader_fn."""
    data = job_config.data
    if data.source == "shards":
        return build_shard_loader(dp_world_size, dp_rank, tokenizer, job_config, infinite)
    if data.source == "stdlib":
        from .stdlib_corpus import read_document, stdlib_files

        documents = stdlib_files()
        if data.max_documents > 0:
            documents = documents[: data.max_documents]
        read = read_document
    else:
        raise ValueError(
            f"[data] source = {data.source!r}: use 'stdlib' or 'shards' (with [data] path)"
        )
    training = job_config.training
    seq_len_ramp, batch_ramp, microbatches = _ramps(job_config, dp_world_size)
    return PackedDocumentLoader(
        documents, read, tokenizer, seq_len=training.seq_len,
        batch_size=training.local_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size,
        seed=data.seed, infinite=infinite, seq_len_ramp=seq_len_ramp, batch_ramp=batch_ramp,
        microbatches_per_step=microbatches,
    )


STDLIB_VAL_DOCUMENTS = 32


def build_validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config,
                                infinite: bool = False) -> HeldOutLoader:
    """Held-out batches for validation: finite (unless infinite) and the same on every call.

    source = "shards": the "val" shards of [data] val_path (default: [data] path).
    source = "stdlib": the stdlib's own test files, which training never sees.
    Shapes come from [validation] local_batch_size and seq_len."""
    data, val = job_config.data, job_config.validation
    if data.source == "shards" or data.val_path:
        path = data.val_path or data.path
        manifest = open_prepared(path, tokenizer, data.verify_checksums, "val", job_config)
        streams = [np.memmap(manifest.directory / r["file"], dtype=r["dtype"], mode="r")
                   for n in manifest.sources("val") for r in manifest.shards_of(n, "val")]
        name = str(manifest.path)
    elif data.source == "stdlib":
        from .stdlib_corpus import read_document, stdlib_test_files

        docs = stdlib_test_files()[:STDLIB_VAL_DOCUMENTS]
        ids = [t for d in docs for t in tokenizer.encode(read_document(d), add_eos=True)]
        streams, name = [np.array(ids, dtype=np.int64)], "the stdlib test files"
    else:
        raise ValueError(f"[data] source = {data.source!r}: no held-out data for it")
    return HeldOutLoader(streams, val.seq_len, val.local_batch_size, dp_rank, dp_world_size,
                         infinite=infinite, source_name=name)

"""Packed next-token batches from a document stream, with exact, checkpointable position.

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

import torch

from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools.logging import logger

from ..training.ramp import Ramp


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


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = True):
    """TrainSpec.build_dataloader_fn."""
    data = job_config.data
    if data.source == "stdlib":
        from .stdlib_corpus import read_document, stdlib_files

        documents = stdlib_files()
        if data.max_documents > 0:
            documents = documents[: data.max_documents]
        read = read_document
    else:
        raise ValueError(
            f"[data] source = {data.source!r} is not supported yet; use 'stdlib'"
        )
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
    return PackedDocumentLoader(
        documents, read, tokenizer, seq_len=training.seq_len,
        batch_size=training.local_batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size,
        seed=data.seed, infinite=infinite, seq_len_ramp=seq_len_ramp, batch_ramp=batch_ramp,
        microbatches_per_step=microbatches,
    )

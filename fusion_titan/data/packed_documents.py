"""Training rows packed on the fly from a document list (`[data] source = "stdlib"`).

A `GlobalRowLoader` (global_batch.py: one global row stream, each rank taking its slice of every
step). Documents are tokenized in a seeded order per epoch (all of them, on every rank), joined
with EOS, and cut into rows of seq_len + 1 tokens (input = row[:-1], labels = row[1:]); the last
token of a row is the first of the next, so no target is skipped. The stream state is (epoch,
next document, the tokens left over after the last row): all a resumed run needs.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np

from torchtitan.tools.logging import logger

from .global_batch import BatchPlan, GlobalRowLoader


class PackedDocumentLoader(GlobalRowLoader):
    STATE_KEY = "packed_documents"

    def __init__(self, documents: list, read: Callable[[Any], str], tokenizer, plan: BatchPlan,
                 seed: int = 0, infinite: bool = True, prefetch: int = 0, document_ids: bool = False):
        if not documents:
            raise ValueError("the data source has no documents")
        super().__init__(plan, (0, 0, ()), prefetch, infinite, tokenizer.eos_id, document_ids)
        self.documents, self.read, self.tokenizer, self.seed = documents, read, tokenizer, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.documents)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time
        return self._orders[epoch]

    def _rows(self, stream, step, first, n, seq_len, keep):
        epoch, cursor, left = stream
        tokens = list(left)
        while len(tokens) < n * seq_len + 1:
            order = self._order(epoch)
            if cursor == len(order):
                if not self.infinite:
                    return None
                epoch, cursor = epoch + 1, 0
                logger.info(f"data: epoch {epoch} of the document stream starts")
                continue
            text = self.read(self.documents[order[cursor]])
            tokens.extend(self.tokenizer.encode(text, add_eos=True))
            cursor += 1
        rows = [np.asarray(tokens[j * seq_len : (j + 1) * seq_len + 1], dtype=np.int64) for j in keep]
        return rows, (epoch, cursor, tuple(tokens[n * seq_len :]))

    def _identity(self) -> dict:
        return {"n_documents": len(self.documents), "seed": self.seed}

    def _mismatch_hint(self) -> str:
        return "resume on the same corpus ([data] max_documents) and [data] seed"

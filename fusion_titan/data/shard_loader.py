"""Training rows from prepared shards: memory-mapped, mixed by weight, curriculum, exact resume.

A `GlobalRowLoader` (global_batch.py: one global row stream, each rank taking its slice of every
step). The source of each of a step's global rows is drawn from a generator keyed by (seed,
step), with the weights of the curriculum stage of that step; each source is its own infinite
token stream (its shards concatenated, in a seeded order per epoch) read at its own cursor, which
advances by seq_len per row (the last label of a row is the next row's first input). The stream
state is one cursor per source.
"""

from __future__ import annotations

import zlib

import numpy as np

from .global_batch import BatchPlan, GlobalRowLoader
from .mixture import Curriculum
from .shards import Manifest


class SourceStream:
    """One source's shards as an endless token stream; position = absolute token index."""

    def __init__(self, name: str, manifest: Manifest, records: list[dict], seed: int):
        self.name = name
        self.files = [manifest.directory / r["file"] for r in records]
        self.sizes = np.array([r["tokens"] for r in records], dtype=np.int64)
        self.dtypes = [np.dtype(r["dtype"]) for r in records]
        self.total = int(self.sizes.sum())
        self.seed = seed
        self._maps: dict[int, np.ndarray] = {}
        self._epoch = -1

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtypes[i], mode="r")
        return self._maps[i]

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch != self._epoch:  # shard order of this epoch, and where each shard starts
            rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
            self._order = rng.permutation(len(self.files)) if epoch > 0 else np.arange(len(self.files))
            self._starts = np.concatenate([[0], np.cumsum(self.sizes[self._order])])
            self._epoch = epoch
        return self._order, self._starts

    def read(self, pos: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            epoch, off = divmod(pos + done, self.total)
            order, starts = self._layout(epoch)
            k = int(np.searchsorted(starts, off, side="right")) - 1
            shard_off = off - int(starts[k])
            take = min(n - done, int(self.sizes[order[k]]) - shard_off)
            out[done : done + take] = self._map(int(order[k]))[shard_off : shard_off + take]
            done += take
        return out


class ShardLoader(GlobalRowLoader):
    """The global rows of prepared shards: each row's source drawn by weight, read at its cursor."""

    STATE_KEY = "shard_loader"

    def __init__(self, streams: list[SourceStream], curriculum: Curriculum, plan: BatchPlan,
                 seed: int = 0, prefetch: int = 4, infinite: bool = True,
                 eos_id: int | None = None, document_ids: bool = False):
        if [s.name for s in streams] != list(curriculum.sources):
            raise ValueError("streams and curriculum must list the same sources in the same order")
        # stream state: per source, the absolute token index of its next row
        super().__init__(plan, tuple(0 for _ in streams), prefetch, infinite, eos_id, document_ids)
        self.streams, self.curriculum, self.seed = streams, curriculum, seed

    def _rows(self, stream, step, first, n, seq_len, keep):
        # every row of the step draws its source; one generator per (seed, step)
        draws = np.random.default_rng([self.seed, step]).random(self.plan.global_rows(step))
        choice = self.curriculum.choose(step, draws[first : first + n])
        positions = list(stream)
        rows = []
        for j, src in enumerate(choice):
            source = self.streams[src]
            start = positions[src]
            positions[src] = start + seq_len  # a row's last label is the next row's first input
            if not self.infinite and start + seq_len + 1 > source.total:
                return None  # finite: stop before any source wraps around
            if j in keep:
                rows.append(source.read(start, seq_len + 1))
        return rows, tuple(positions)

    def _identity(self) -> dict:
        return {"sources": [s.name for s in self.streams], "tokens": [s.total for s in self.streams],
                "seed": self.seed}

    def _mismatch_hint(self) -> str:
        return "resume on the same [data] path and seed"

"""Training batches from prepared shards: memory-mapped, mixed by weight, curriculum, exact resume.

The stream is global: every micro-batch is `rows x world_size` rows of seq_len + 1 tokens, rank r
taking rows [r * rows, (r + 1) * rows). The source of each row is drawn from a generator keyed by
(seed, micro-batch number), with the current curriculum stage's weights; each source is its own
infinite token stream (its shards concatenated, in a seeded order per epoch) read at its own
cursor, which advances by seq_len per row (the last label of a row is the next row's first input).
Every rank simulates all draws, so the state (micro-batches served, one cursor per source) is the
same on every rank: it is saved once, and a resume may use another number of ranks (the global
rows continue where they stopped; with the same global micro-batch the rows are the same).

Ramps (fusion_titan/training/ramp.py) and curriculum stages follow the optimizer step, i.e.
micro-batches served // micro-batches per step.
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch

from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools.logging import logger

from ..training.ramp import Ramp
from .mixture import Curriculum
from .prefetch import prefetched
from .shards import Manifest

STATE_KEY = "shard_loader"


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


@dataclass(frozen=True)
class LoaderState:
    batches: int  # micro-batches served by each rank
    positions: tuple[int, ...]  # per source, absolute token index of its next row

    def steps(self, microbatches_per_step: int) -> int:
        return self.batches // microbatches_per_step


class ShardLoader(BaseDataLoader):
    def __init__(self, streams: list[SourceStream], curriculum: Curriculum, dp_rank: int,
                 dp_world_size: int, seq_len_ramp: Ramp, batch_ramp: Ramp,
                 microbatches_per_step: int = 1, seed: int = 0, prefetch: int = 4,
                 infinite: bool = True, eos_id: int | None = None, document_ids: bool = False):
        if [s.name for s in streams] != list(curriculum.sources):
            raise ValueError("streams and curriculum must list the same sources in the same order")
        self.streams, self.curriculum = streams, curriculum
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seq_len_ramp, self.batch_ramp = seq_len_ramp, batch_ramp
        self.microbatches_per_step = microbatches_per_step
        self.seed, self.prefetch, self.infinite = seed, prefetch, infinite
        self.eos_id, self.document_ids = eos_id, document_ids
        if document_ids and eos_id is None:
            raise ValueError("document_ids needs the EOS id")
        self.state = LoaderState(0, tuple(0 for _ in streams))

    def _produce(self, state: LoaderState):
        steps = state.steps(self.microbatches_per_step)
        seq_len, n = self.seq_len_ramp(steps), self.batch_ramp(steps)
        rng = np.random.default_rng([self.seed, state.batches])
        choice = self.curriculum.choose(steps, rng.random(n * self.dp_world_size))
        positions = list(state.positions)
        rows = []
        mine = range(self.dp_rank * n, (self.dp_rank + 1) * n)
        for j, src in enumerate(choice):
            stream = self.streams[src]
            start = positions[src]
            positions[src] = start + seq_len
            if not self.infinite and start + seq_len + 1 > stream.total:
                return None  # finite: stop before any source wraps around
            if j in mine:
                rows.append(stream.read(start, seq_len + 1))
        batch = torch.from_numpy(np.stack(rows))
        inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        out = {"input": inputs, "labels": labels}
        if self.document_ids:
            out["document_ids"] = document_ids(inputs, self.eos_id)
        return (out, labels), LoaderState(state.batches + 1, tuple(positions))

    def _consume(self, state: LoaderState) -> None:
        self.state = state

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return prefetched(self._produce, self.state, self.prefetch, self._consume)

    def _identity(self) -> dict:
        return {"sources": [s.name for s in self.streams], "tokens": [s.total for s in self.streams],
                "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        # the same on every rank (all ranks simulate the global stream): saved once by DCP
        state = {"batches": self.state.batches, "positions": list(self.state.positions),
                 "microbatches_per_step": self.microbatches_per_step,
                 "world_size": self.dp_world_size, **self._identity()}
        return {STATE_KEY: pickle.dumps(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if STATE_KEY not in state_dict:
            raise KeyError(f"the checkpoint's data position is not a shard-loader position "
                           f"(keys {sorted(state_dict)}); it was saved with another [data] source")
        saved = pickle.loads(state_dict[STATE_KEY])
        if {k: saved[k] for k in ("sources", "tokens", "seed")} != self._identity():
            raise ValueError(
                "the checkpoint's data position belongs to other prepared data or another seed "
                f"(sources {saved['sources']} with {saved['tokens']} tokens, seed {saved['seed']}; now "
                f"{self._identity()}); resume on the same [data] path and seed, or start the data "
                "from scratch with [checkpoint] exclude_from_loading = ['dataloader']")
        batches = saved["batches"]
        old_mb = saved["microbatches_per_step"]
        if (saved["world_size"], old_mb) != (self.dp_world_size, self.microbatches_per_step):
            if batches % old_mb:
                raise ValueError(f"the checkpoint's data position is mid-step ({batches} micro-batches, "
                                 f"{old_mb} per step): it cannot move to another number of ranks")
            batches = batches // old_mb * self.microbatches_per_step
            logger.info(f"data: resuming with {self.dp_world_size} data-parallel ranks (saved with "
                        f"{saved['world_size']}) at optimizer step {saved['batches'] // old_mb}")
        self.state = replace(self.state, batches=batches, positions=tuple(saved["positions"]))


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token, the index of its document within the row; an EOS belongs to the document it ends."""
    is_eos = (inputs == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos


class HeldOutLoader:
    """Finite, deterministic validation batches from held-out token streams.

    Rows of seq_len + 1 are cut from each stream in order; rank r takes rows r, r + W, ...;
    every rank gets the same number of full batches (uneven counts would hang collectives)."""

    def __init__(self, streams: list[np.ndarray], seq_len: int, batch_size: int, dp_rank: int,
                 dp_world_size: int, infinite: bool = False, source_name: str = "held-out data"):
        starts = [(i, s) for i, t in enumerate(streams) for s in range(0, len(t) - seq_len, seq_len)]
        per_rank = len(starts) // dp_world_size // batch_size * batch_size
        if per_rank == 0:
            raise ValueError(f"{source_name}: {sum(len(t) for t in streams)} held-out tokens give no "
                             f"full batch of {batch_size} x {seq_len} per rank over {dp_world_size} "
                             "ranks; hold out more (prepare_data.py --val-fraction) or lower "
                             "[validation] seq_len / local_batch_size")
        self.rows = starts[dp_rank :: dp_world_size][:per_rank]
        self.streams, self.seq_len, self.batch_size, self.infinite = streams, seq_len, batch_size, infinite

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            for b in range(0, len(self.rows), self.batch_size):
                rows = [np.asarray(self.streams[i][s : s + self.seq_len + 1], dtype=np.int64)
                        for i, s in self.rows[b : b + self.batch_size]]
                batch = torch.from_numpy(np.stack(rows))
                labels = batch[:, 1:].contiguous()
                yield {"input": batch[:, :-1].contiguous(), "labels": labels}, labels
            if not self.infinite:
                return

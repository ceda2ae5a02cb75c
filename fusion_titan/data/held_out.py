"""Validation batches: finite, deterministic rows cut from held-out token streams."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


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

"""One global row stream per run, each data-parallel rank taking its slice of every step.

The global batch of optimizer step s (s steps taken) is G(s) rows of L(s) + 1 tokens, where G is
`[training] global_batch_size` (or the `batch_ramp`, in the same unit: sequences per optimizer
step) and L the sequence length (or the `seq_len_ramp`). Which rows they are depends on the data,
the seed, s and G only, never on how many ranks share them: with W data-parallel ranks and A
micro-batches per step (gradient accumulation), every micro-batch has l = G / (W * A) rows per
rank, and micro-batch k of rank r is the step's rows [(k * W + r) * l, (k * W + r + 1) * l).
So micro-batch k covers the group of rows [k * W * l, (k + 1) * W * l): every rank reads through
the whole group (the stream position after it is the same on every rank) and keeps its slice.

`GlobalRowLoader` is that scheme for any row source (the stdlib packer, the prepared shards):
the source implements `_rows`; this class adds the micro-batch slicing, document ids, the
prefetch thread and the checkpointed position. That position, (step, micro-batch within the
step, the source's stream state), is the same on every rank, so it is saved once, and a resume
at a step boundary may use another number of ranks or micro-batches: the global rows go on
exactly where they stopped.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools.logging import logger

from ..training.ramp import Ramp
from .prefetch import prefetched


@dataclass(frozen=True)
class BatchPlan:
    """How a step's global rows are shaped and split among ranks and micro-batches."""

    dp_rank: int
    dp_world_size: int
    microbatches_per_step: int
    seq_len: Ramp  # tokens per row (+1 for the last label), by steps taken
    global_rows: Ramp  # rows per optimizer step, by steps taken

    def local_rows(self, step: int) -> int:
        return self.global_rows(step) // (self.dp_world_size * self.microbatches_per_step)

    def group(self, step: int, microbatch: int) -> tuple[int, int]:
        """(first row, number of rows) of micro-batch `microbatch`'s group within the step."""
        n = self.local_rows(step) * self.dp_world_size
        return microbatch * n, n

    def mine(self, step: int) -> range:
        """This rank's rows within a group."""
        n = self.local_rows(step)
        return range(self.dp_rank * n, (self.dp_rank + 1) * n)


def batch_plan(job_config, dp_world_size: int, dp_rank: int) -> BatchPlan:
    """The plan of `[training]`: global_batch_size, local_batch_size, seq_len and the ramps."""
    training = job_config.training
    local = training.local_batch_size
    global_batch = training.global_batch_size if training.global_batch_size > 0 else local * dp_world_size
    if global_batch % (local * dp_world_size):
        raise ValueError(f"[training] global_batch_size = {global_batch} is not a multiple of "
                         f"local_batch_size x data-parallel ranks = {local} x {dp_world_size}; "
                         "change one of them")
    microbatches = global_batch // (local * dp_world_size)
    seq_len = Ramp.from_config("seq_len_ramp", getattr(training, "seq_len_ramp", None),
                               getattr(training, "seq_len_ramp_steps", None),
                               default=training.seq_len, maximum=training.seq_len)
    rows = Ramp.from_config("batch_ramp", getattr(training, "batch_ramp", None),
                            getattr(training, "batch_ramp_steps", None),
                            default=global_batch, maximum=global_batch)
    split = dp_world_size * microbatches
    uneven = [v for v in rows.values if v % split]
    if uneven:
        raise ValueError(
            f"[training] batch_ramp values {uneven} (sequences per optimizer step) must be "
            f"multiples of data-parallel ranks x micro-batches per step = {dp_world_size} x "
            f"{microbatches} = {split}, so that every rank's micro-batches have equal rows")
    return BatchPlan(dp_rank, dp_world_size, microbatches, seq_len, rows)


@dataclass(frozen=True)
class Position:
    """Where the global stream stands; identical on every rank."""

    step: int  # optimizer steps whose rows were all served
    microbatch: int  # micro-batches of the current step already served
    stream: Any  # the row source's state after the rows served so far (immutable)


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token, the index of its document within the row; an EOS belongs to the document it ends."""
    is_eos = (inputs == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos


class GlobalRowLoader(BaseDataLoader):
    """Micro-batches of this rank's slice of a global row stream (see the module docstring)."""

    STATE_KEY = "global_rows"

    def __init__(self, plan: BatchPlan, stream: Any, prefetch: int = 0, infinite: bool = True,
                 eos_id: int | None = None, document_ids: bool = False):
        if document_ids and eos_id is None:
            raise ValueError("document_ids needs the EOS id")
        self.plan, self.prefetch, self.infinite = plan, prefetch, infinite
        self.eos_id, self.document_ids = eos_id, document_ids
        self.position = Position(0, 0, stream)

    # ---- what a row source provides ----

    def _rows(self, stream: Any, step: int, first: int, n: int, seq_len: int,
              keep: range) -> tuple[list[np.ndarray], Any] | None:
        """Rows first .. first + n - 1 of step `step` (each seq_len + 1 tokens), read from
        `stream` (the state after row first - 1): the rows whose index within the n is in
        `keep`, and the state after the n rows. None at the end of a finite stream."""
        raise NotImplementedError

    def _identity(self) -> dict:
        """What a checkpoint's position must match to be loadable (data, seed)."""
        raise NotImplementedError

    def _mismatch_hint(self) -> str:
        return "resume on the same data and seed"

    # ---- the slicing ----

    def _produce(self, pos: Position):
        plan = self.plan
        first, n = plan.group(pos.step, pos.microbatch)
        out = self._rows(pos.stream, pos.step, first, n, plan.seq_len(pos.step), plan.mine(pos.step))
        if out is None:
            return None
        rows, stream = out
        batch = torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))
        inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        # labels also ride in the input dict: the model fuses head + loss (see model.py).
        item = {"input": inputs, "labels": labels}
        if self.document_ids:
            item["document_ids"] = document_ids(inputs, self.eos_id)
        if pos.microbatch + 1 == plan.microbatches_per_step:
            nxt = Position(pos.step + 1, 0, stream)
        else:
            nxt = Position(pos.step, pos.microbatch + 1, stream)
        return (item, labels), nxt

    def _consume(self, pos: Position) -> None:
        self.position = pos

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return prefetched(self._produce, self.position, self.prefetch, self._consume)

    # ---- checkpointed position ----

    def state_dict(self) -> dict[str, Any]:
        # the same on every rank (all ranks read the whole global stream): DCP saves it once
        pos = self.position
        state = {"step": pos.step, "microbatch": pos.microbatch, "stream": pos.stream,
                 "world_size": self.plan.dp_world_size,
                 "microbatches_per_step": self.plan.microbatches_per_step,
                 "global_rows": self.plan.global_rows(pos.step), **self._identity()}
        return {self.STATE_KEY: pickle.dumps(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.STATE_KEY not in state_dict:
            raise KeyError(f"the checkpoint's data position (keys {sorted(state_dict)}) was not "
                           f"saved by this kind of loader ({self.STATE_KEY!r}); it was written with "
                           "another [data] source. Start the data from scratch with "
                           "[checkpoint] exclude_from_loading = ['dataloader']")
        saved = pickle.loads(state_dict[self.STATE_KEY])
        mine = self._identity()
        if {k: saved.get(k) for k in mine} != mine:
            raise ValueError(
                "the checkpoint's data position belongs to other data or another seed (saved: "
                f"{ {k: saved.get(k) for k in mine} }; now {mine}); {self._mismatch_hint()}, or "
                "start the data from scratch with [checkpoint] exclude_from_loading = ['dataloader']")
        split = (saved["world_size"], saved["microbatches_per_step"], saved["global_rows"])
        now = (self.plan.dp_world_size, self.plan.microbatches_per_step,
               self.plan.global_rows(saved["step"]))
        if saved["microbatch"] and split != now:
            raise ValueError(
                f"the checkpoint's data position is in the middle of optimizer step "
                f"{saved['step'] + 1} (micro-batch {saved['microbatch']} of "
                f"{saved['microbatches_per_step']}, {saved['world_size']} ranks, "
                f"{saved['global_rows']} rows per step): it can only continue with the same ranks, "
                f"micro-batches and global batch (now {now[0]}, {now[1]}, {now[2]})")
        if split != now:
            logger.info(f"data: resuming at optimizer step {saved['step']} with {now[0]} ranks x "
                        f"{now[1]} micro-batches (saved with {split[0]} x {split[1]}); the global "
                        "rows continue where they stopped")
        self.position = Position(saved["step"], saved["microbatch"], saved["stream"])

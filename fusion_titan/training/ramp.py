"""Batch-size and sequence-length ramps: piecewise-constant values that change at given steps.

`[training] seq_len_ramp = [512, 1024, 4096]` with `seq_len_ramp_steps = [0, 1000, 3000]`
trains steps 1-1000 at 512 tokens, 1001-3000 at 1024, then 4096 (optimizer steps, 1-based;
a boundary s means "from the step after s on"). `batch_ramp` does the same for the global batch
(sequences per optimizer step, split over ranks and micro-batches by fusion_titan/data/
global_batch.py). Unset = constant `seq_len` / `global_batch_size`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Ramp:
    steps: tuple[int, ...]  # optimizer steps already taken when each value starts
    values: tuple[int, ...]

    def __call__(self, steps_taken: int) -> int:
        return self.values[bisect.bisect_right(self.steps, steps_taken) - 1]

    @classmethod
    def constant(cls, value: int) -> "Ramp":
        return cls((0,), (value,))

    @classmethod
    def from_config(cls, name: str, values, steps, default: int, maximum: int | None = None) -> "Ramp":
        if not values:
            return cls.constant(default)
        values, steps = tuple(int(v) for v in values), tuple(int(s) for s in (steps or ()))
        fix = f"set [training] {name} and {name}_steps to lists of equal length, steps starting at 0"
        if len(values) != len(steps):
            raise ValueError(f"{name} has {len(values)} values but {len(steps)} steps: {fix}")
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"{name}_steps must start at 0 and increase: {list(steps)}; {fix}")
        if any(v <= 0 for v in values):
            raise ValueError(f"{name} values must be positive: {list(values)}")
        if maximum is not None and max(values) > maximum:
            raise ValueError(
                f"{name} reaches {max(values)}, above {maximum} (the configured maximum); raise "
                "it or lower the ramp"
            )
        return cls(steps, values)

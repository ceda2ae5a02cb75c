"""Source mixture and curriculum: per-source weights by stage, switching at optimizer steps.

    [data]
    stage_weights = ["web=0.9 stdlib=0.1", "web=0.5 stdlib=0.5"]
    stage_steps = [0, 1000]      # stage 2 from the step after 1000 on (the ramps' convention)

From the CLI (torchtitan parses a list of strings from ONE comma-separated argument, so stages
are separated by commas and a stage's entries by spaces):
`--data.stage_weights "web=1,web=0.5 stdlib=0.5" --data.stage_steps 0 1000`.
Weights are normalized per stage; a source a stage does not name gets 0. No stage_weights = one
stage weighting every source by its token count (the natural mixture).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Curriculum:
    sources: tuple[str, ...]
    steps: tuple[int, ...]  # optimizer steps already taken when each stage starts
    weights: tuple[tuple[float, ...], ...]  # per stage, normalized, in `sources` order

    def stage(self, steps_taken: int) -> int:
        return bisect.bisect_right(self.steps, steps_taken) - 1

    def cumulative(self, steps_taken: int) -> np.ndarray:
        return np.cumsum(self.weights[self.stage(steps_taken)])

    def choose(self, steps_taken: int, uniforms: np.ndarray) -> np.ndarray:
        """Source index per uniform draw in [0, 1)."""
        cum = self.cumulative(steps_taken)
        idx = np.searchsorted(cum, uniforms * cum[-1], side="right")
        return np.minimum(idx, len(cum) - 1)


def _parse_stage(text: str, sources: list[str]) -> tuple[float, ...]:
    weights = dict.fromkeys(sources, 0.0)
    for part in text.split():
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"[data] stage_weights entry {text!r}: write 'source=weight source=weight' "
                             "(entries separated by spaces, stages by commas on the CLI)")
        if name not in weights:
            raise ValueError(f"[data] stage_weights names source {name!r}, which the prepared data "
                             f"does not have; its sources are {sources}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"[data] stage_weights: {value!r} is not a number (in {text!r})") from None
        if w < 0 or not np.isfinite(w):
            raise ValueError(f"[data] stage_weights: weight of {name!r} must be >= 0, got {w}")
        weights[name] = w
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"[data] stage_weights entry {text!r} gives every source weight 0")
    return tuple(weights[s] / total for s in sources)


def build_curriculum(stage_weights: list[str], stage_steps: list[int], sources: list[str],
                     source_tokens: dict[str, int]) -> Curriculum:
    if not stage_weights:
        if stage_steps and list(stage_steps) != [0]:
            raise ValueError(f"[data] stage_steps = {list(stage_steps)} without stage_weights")
        total = sum(source_tokens[s] for s in sources)
        return Curriculum(tuple(sources), (0,), (tuple(source_tokens[s] / total for s in sources),))
    steps = list(stage_steps) if stage_steps else ([0] if len(stage_weights) == 1 else [])
    fix = "stage_steps lists the step each stage starts at: as many as stage_weights, first 0, increasing"
    if len(steps) != len(stage_weights):
        raise ValueError(f"[data] {len(stage_weights)} stage_weights but {len(steps)} stage_steps; {fix}")
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"[data] stage_steps = {steps} must start at 0 and increase; {fix}")
    return Curriculum(tuple(sources), tuple(int(s) for s in steps),
                      tuple(_parse_stage(w, sources) for w in stage_weights))

"""Read logged scalars back from a run's TensorBoard event files (tests, comparison scripts)."""

from __future__ import annotations

from pathlib import Path


def read_scalars(dump_folder: str | Path, tag: str, tb_folder: str = "tb") -> dict[int, float]:
    """{step: value} of `tag` over every event file under dump_folder/tb_folder (float32 as logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted((Path(dump_folder) / tb_folder).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values

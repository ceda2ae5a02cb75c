"""Read logged scalars back from a run's TensorBoard event files (tests, comparison and plot scripts)."""

from __future__ import annotations

from pathlib import Path


def read_all_scalars(dump_folder: str | Path, tb_folder: str = "tb") -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file under dump_folder/tb_folder (float32 as logged).

    A resumed run writes a new event file; files are read in name (= start time) order, so a
    step logged twice keeps the later run's value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in sorted((Path(dump_folder) / tb_folder).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def read_scalars(dump_folder: str | Path, tag: str, tb_folder: str = "tb") -> dict[int, float]:
    """{step: value} of one `tag` (see read_all_scalars)."""
    return read_all_scalars(dump_folder, tb_folder).get(tag, {})

"""Which GPUs each concurrent run of a sweep trains on.

On a machine with more GPUs than one run uses (`ngpu`), runs trained at once (`jobs`) are spread
over disjoint GPU sets ("slots", `CUDA_VISIBLE_DEVICES` of the run) instead of all starting on
the first GPUs: with jobs <= slots every run has its GPUs to itself (only the host is shared),
and beyond that each slot takes runs in turn. One slot (a one-GPU machine, a CPU machine, or
runs that use every GPU) means no placement at all: runs see what the sweep sees.
"""

from __future__ import annotations

import os
import queue
from contextlib import contextmanager


def visible_devices(device_count: int) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES's entries when set (they are
    what the runs' CUDA_VISIBLE_DEVICES must name), else 0 .. device_count - 1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:device_count]
    return [str(i) for i in range(device_count)]


def gpu_slots(devices: list[str], ngpu: int) -> list[str]:
    """Disjoint sets of `ngpu` devices, as CUDA_VISIBLE_DEVICES values; [] when fewer than two
    sets fit (placement would change nothing)."""
    if ngpu < 1 or len(devices) < 2 * ngpu:
        return []
    return [",".join(devices[i:i + ngpu]) for i in range(0, len(devices) - ngpu + 1, ngpu)]


class SlotPool:
    """`jobs` tickets over the slots, dealt round-robin (slot k gets tickets k, k + n, ...): a run
    holds one ticket while it trains, so at most ceil(jobs / slots) runs share a slot."""

    def __init__(self, slots: list[str], jobs: int):
        self.slots = slots
        self._tickets: queue.Queue = queue.Queue()
        for j in range(jobs):
            self._tickets.put(slots[j % len(slots)] if slots else None)

    @contextmanager
    def env(self):
        """The extra environment of one run ({} without placement), held while the run trains."""
        slot = self._tickets.get()
        try:
            yield {} if slot is None else {"CUDA_VISIBLE_DEVICES": slot}
        finally:
            self._tickets.put(slot)

    def describe(self, jobs: int) -> str:
        """One sentence for the report on how this invocation's runs shared the machine ('' for
        one run at a time without placement); each run's GPU set is in its result ("gpus")."""
        if not self.slots:
            return (f"{jobs} runs trained at once on the same GPU(s): tokens/s, MFU and seconds are "
                    "those of a shared GPU; compare variants at equal FLOPs.") if jobs > 1 else ""
        per_slot = -(-jobs // len(self.slots))
        used = self.slots[:min(jobs, len(self.slots))]
        where = f"{len(used)} GPU set(s) ({', '.join(used)})"
        if jobs == 1:
            return f"one run at a time, on {where}."
        if per_slot == 1:
            return (f"{jobs} runs trained at once on {where}, each on its own GPU(s): tokens/s and "
                    "MFU are unshared GPU figures (the host's CPUs were shared).")
        return (f"{jobs} runs trained at once on {where}, up to {per_slot} per set: tokens/s, MFU and "
                "seconds are those of a shared GPU; compare variants at equal FLOPs.")

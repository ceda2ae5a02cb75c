"""How many ATen ops a piece of code dispatches from Python: its host cost on a GPU.

A step made of many small ops is host-bound on a GPU (each op costs microseconds of Python and
dispatch before its kernel launches), so their count is what to keep low; it can be counted on
CPU. Only top-level ops count: a foreach op is one op, whatever it runs inside on CPU (on CUDA
it launches a few fused kernels), and a view's inner `as_strided` is not counted again.
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def top_level_aten_ops(fn: Callable[[], object]) -> int:
    """ATen ops that `fn()` dispatches, nested ones not counted (torch.profiler, CPU)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = lambda e: e is not None and e.name.startswith("aten::")  # noqa: E731
    return sum(1 for e in prof.events() if aten(e) and not aten(e.cpu_parent))

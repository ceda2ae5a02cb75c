"""Where a run's wall time went, from the trainer's log timestamps (torchtitan's `[titan] <asctime>`).

    wall = startup + train + eval + shutdown
    startup   process start -> the end of step 1 (launcher and imports, tokenizer, data, model
              build and init, optimizer: `init`; then step 1 with Triton autotuning and any
              compilation: `first_step`)
    train     end of step 1 -> end of the last logged step, evaluations excluded
    eval      every held-out evaluation: its `validate step:` line minus the line before it
              (the step line of the same step: evaluations follow the step's log)
    shutdown  the last of those lines -> process exit (torchtitan's 2 s sleep, TensorBoard
              flush, process-group teardown, the launcher's exit)

A phase whose log line never came (a crash, a timeout) is None; the others still count.
"""

from __future__ import annotations

import re
from datetime import datetime

from ..bench.train_log import strip_ansi

STAMPED = re.compile(r"\[titan\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \S+ - \w+ - (.*)")
STEP = re.compile(r"step:\s*(\d+)/\d+\s+loss:")
VALIDATE = re.compile(r"validate step:\s*(\d+)")
TRAINING_STARTS = "Training starts at step"


def stamped_lines(log: str) -> list[tuple[float, str]]:
    """(POSIX time, message) of every timestamped trainer line (asctime is local time)."""
    out = []
    for line in strip_ansi(log).splitlines():
        m = STAMPED.search(line)
        if m:
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((when, m[2]))
    return out


def phases(log: str, started: float, ended: float) -> dict[str, float | None]:
    """Seconds per phase (module docstring) of a run whose process ran from started to ended."""
    lines = stamped_lines(log)
    steps = [(t, int(m[1])) for t, msg in lines if (m := STEP.match(msg))]
    evals = []  # (step, seconds)
    for (before, _), (t, msg) in zip(lines, lines[1:]):
        if m := VALIDATE.match(msg):
            evals.append((int(m[1]), t - before))
    init = next((t - started for t, msg in lines if msg.startswith(TRAINING_STARTS)), None)
    first = steps[0][0] if steps else None
    last_step = steps[-1] if steps else None
    out = {"wall": ended - started, "init": init,
           "first_step": first - started - init if first is not None and init is not None else None,
           "startup": first - started if first is not None else None,
           "train": None, "eval": sum(s for _, s in evals) if evals else None, "shutdown": None}
    if last_step is not None:
        t_last, n_last = last_step
        out["train"] = t_last - first - sum(s for step, s in evals if step < n_last)
        t_end = max(t_last, *(t for t, msg in lines if VALIDATE.match(msg))) if evals else t_last
        out["shutdown"] = ended - t_end
    return out

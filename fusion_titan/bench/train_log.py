"""Per-step metrics read back from the console log (scripts/benchmark.py, resume_check.py).

Both torchtitan's step lines and ours (`step: 5/60  loss: ...`, fusion_titan/training/metrics.py).
"""

from __future__ import annotations

import re
import subprocess

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LINE = re.compile(r"step:\s*(\d+)(?:/\d+)?\s+loss:\s*(nan|[-+]?inf|[\d.]+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)"
                       r"(?:.*?tflops:\s*([\d.]+))?(?:.*?mfu:\s*([\d.]+)%)?")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def parse_steps(log: str) -> dict[int, dict]:
    """{step: {"loss", "mem_gib" (peak reserved), "tps", "mfu" (None if not logged)}}."""
    steps = {}
    for line in strip_ansi(log).splitlines():
        m = STEP_LINE.search(line)
        if m:
            steps[int(m[1])] = {"loss": float(m[2]), "mem_gib": float(m[3]),
                                "tps": float(m[4].replace(",", "")),
                                "mfu": float(m[6]) if m[6] else None}
    return steps


def run_captured(cmd: list[str], cwd, env: dict, timeout: float) -> tuple[str, int | str]:
    """Run a trainer command; its combined output and return code ("timeout" if it ran out)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        return proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        err = e.stderr or b""
        as_text = lambda b: b.decode() if isinstance(b, bytes) else b  # noqa: E731
        return as_text(out) + as_text(err), "timeout"

"""One run of a sweep: run_train.sh into its own folder, then its curves read back from TensorBoard.

A run's folder (`<out>/runs/<variant>-seed<S>-<run id>`) holds `train.log` and, once it ends,
`result.json` (finished) or `failure.json` (non-zero exit or timeout, with the log's last lines).
Either file marks the run as done: a resumed sweep skips it (`--retry-failed` reruns failures).
A folder with neither is an interrupted run; it is emptied and the run starts over, so its
TensorBoard curves never mix two attempts. A run that ends because the sweep itself is being
stopped (Ctrl-C, `timeout -s INT`: the SIGINT reaches the runs too) is such a run: `STOPPING` set
by the sweep's signal handler, it writes no failure.json and reports status "interrupted".

Wall clock: the trainer logs tokens/s per device for each logged interval (validation and
checkpoint time excluded: fusion_titan/training/metrics.py restarts its clock after them). The
seconds of an interval are its tokens per device / that rate; step 1 (compilation, warm-up) is
reported apart and left out of the curve and of tokens/s, which then describe the steady state.
The whole process's time, startup and evaluations included, is split by timing.py (`timing`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..bench.train_log import run_captured, strip_ansi
from ..training.tb_scalars import read_all_scalars
from .plan import RunPlan
from .timing import phases

RESULT, FAILURE, LOG = "result.json", "failure.json", "train.log"
TAIL_LINES = 25
INTERRUPTED = "interrupted"
# set when the sweep is being stopped: runs that end then were cut, not failed (see above)
STOPPING = threading.Event()


def run_folder(out: Path, plan: RunPlan) -> Path:
    return out / "runs" / plan.name


def finished(folder: Path, retry_failed: bool) -> dict | None:
    """The stored outcome of a run that ended (None: it has to run, also when the stored file
    cannot be read, e.g. an archive taken while it was written)."""
    for name in (RESULT,) if retry_failed else (RESULT, FAILURE):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


@contextmanager
def replaced_atomically(path: Path):
    """Yields a sibling path to write; when the block ends, it replaces path in one rename, so a
    sweep killed (or archived) mid-write sees the previous version or the new one, never half."""
    partial = path.with_name(path.name + ".partial")
    yield partial
    os.replace(partial, path)


def write_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as partial:
        partial.write_text(text)


def wall_clock(steps: list[int], tps: dict[int, float], local_tokens_per_step: float) -> dict[int, float]:
    """{logged step: training seconds since the end of step 1}, from the logged tokens/s."""
    seconds, total, prev = {}, 0.0, None
    for s in steps:
        if prev is not None:
            total += (s - prev) * local_tokens_per_step / tps[s]
        seconds[s] = total
        prev = s
    return seconds


def summarize(plan: RunPlan, scalars: dict[str, dict[int, float]], timing: dict) -> dict:
    """The run's numbers from its TensorBoard scalars (fusion_titan/training/tb_scalars.py)."""
    tps = scalars.get("throughput(tps)", {})
    logged = sorted(tps)
    if not logged or logged[-1] != plan.steps:
        raise RuntimeError(f"the run logged steps {logged[:3]}...{logged[-3:]} but was to end at step "
                           f"{plan.steps}")
    local_tokens = plan.shape.tokens_per_step / plan.shape.dp_degree
    seconds = wall_clock(logged, tps, local_tokens)
    val = scalars.get("validation_metrics/loss", {})
    ppl = scalars.get("validation_metrics/perplexity", {})
    if plan.steps not in val:
        raise RuntimeError(f"no held-out evaluation at the last step {plan.steps} (got steps {sorted(val)})")
    mfu = [v for s, v in scalars.get("mfu(%)", {}).items() if s > 1]
    steady = seconds[plan.steps]
    return {
        "status": "ok", "variant": plan.variant, "seed": plan.seed, "run_id": plan.run_id,
        "steps": plan.steps, "tokens": plan.tokens, "flops": plan.flops,
        "params_total": plan.shape.params_total, "params_active": plan.shape.params_active,
        "flops_per_token": plan.shape.flops_per_token, "tokens_per_step": plan.shape.tokens_per_step,
        "first_step_seconds": local_tokens / tps[logged[0]],
        "timing": timing,  # seconds per phase of the whole process (timing.py)
        "train_seconds": steady,  # after step 1
        "tokens_per_second": (plan.steps - 1) * plan.shape.tokens_per_step / steady if steady else None,
        "mfu_percent": statistics.mean(mfu) if mfu else None,
        "process_seconds": timing["wall"],
        "final_train_loss": scalars["loss_metrics/global_avg_loss"][plan.steps],
        "final_train_ce": scalars.get("loss_metrics/ce", {}).get(plan.steps),
        "heldout_ce": val[plan.steps], "heldout_perplexity": ppl.get(plan.steps),
        "heldout_tokens": scalars.get("validation_metrics/tokens", {}).get(plan.steps),
        # evaluations: step, training FLOPs and steady-state seconds up to it, held-out CE
        "curve": [{"step": s, "flops": s * plan.shape.tokens_per_step * plan.shape.flops_per_token,
                   "seconds": seconds.get(s), "heldout_ce": v} for s, v in sorted(val.items())],
    }


def execute(plan: RunPlan, config: str, out: Path, root: Path, ngpu: int, timeout: float,
            extra_env: dict | None = None) -> dict:
    """Train one run through run_train.sh; its result (also written to its folder)."""
    folder = run_folder(out, plan)
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted attempt: start over
    folder.mkdir(parents=True)
    env = dict(os.environ, CONFIG_FILE=str(config), PYTHONUNBUFFERED="1", **(extra_env or {}))
    if ngpu:
        env["NGPU"] = str(ngpu)
    cmd = ["./run_train.sh", "--job.dump_folder", str(folder.resolve()), *plan.args]
    start = time.time()  # wall clock: the log's timestamps are compared with it
    log, code = run_captured(cmd, cwd=root, env=env, timeout=timeout)
    timing = phases(log, start, time.time())
    write_atomic(folder / LOG, log)
    result = None
    if code == 0:
        try:
            result = summarize(plan, read_all_scalars(folder), timing)
        except (RuntimeError, KeyError) as e:
            code, log = "unreadable", f"{log}\nharness: {type(e).__name__}: {e}"
    if result is None:
        tail = strip_ansi(log).rstrip().splitlines()[-TAIL_LINES:]
        # the run's SIGINT and the sweep's handler race: give the handler a moment to say so
        status = INTERRUPTED if STOPPING.wait(timeout=2.0) else "failed"
        result = {"status": status, "variant": plan.variant, "seed": plan.seed, "run_id": plan.run_id,
                  "exit_code": code, "process_seconds": timing["wall"], "timing": timing, "log_tail": tail}
    # where it trained: the GPU set it was placed on (placement.py), else whatever was visible
    result["gpus"] = (extra_env or {}).get("CUDA_VISIBLE_DEVICES", "visible")
    if result["status"] != INTERRUPTED:  # an interrupted run's folder stays without either file
        write_atomic(folder / (RESULT if result["status"] == "ok" else FAILURE), json.dumps(result, indent=1))
    return result

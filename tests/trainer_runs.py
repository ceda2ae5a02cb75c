"""Shared helpers for tests that run the real trainer through run_train.sh on CPU (slow)."""

import os
import subprocess
from pathlib import Path

from fusion_titan.training.tb_scalars import read_scalars

ROOT = Path(__file__).resolve().parents[1]
# small and quick: the debug model on 64-token rows
QUICK = ("--training.seq_len", "64")
# a fixed init seed, so two fresh runs of the same command train identically (torchtitan draws
# a random one otherwise)
SEEDED = ("--debug.seed", "0")


def launch(dump: Path, *args: str, nproc: int = 1, config: str | None = None, timeout: int = 900,
           expect_ok: bool = True, cpu: bool = True) -> str:
    """./run_train.sh into `dump` (logging every step) with `args`, on CPU unless cpu=False (a
    GPU test); the combined log."""
    env = dict(os.environ, NGPU=str(nproc), PYTHONUNBUFFERED="1")
    if cpu:
        env["FUSION_FORCE_CPU"] = "1"
    if config is not None:
        env["CONFIG_FILE"] = config
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--metrics.log_freq", "1", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, log[-6000:]
    else:
        assert proc.returncode != 0, log[-3000:]
    return log


def run_train(dump: Path, *overrides: str, **kwargs) -> str:
    """launch() of debug_model.toml on 64-token rows."""
    return launch(dump, *QUICK, *overrides, **kwargs)


def tb_losses(dump: Path) -> dict[int, float]:
    return read_scalars(dump, "loss_metrics/global_avg_loss")

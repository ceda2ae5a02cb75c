"""What a person reads from ./run_train.sh on CPU: one line per step with an ETA, no accelerator
noise or colour codes in a file, one message for a config error or a finished run (slow: the
real trainer). Sources: fusion_titan/training/metrics.py, fusion_titan/infra/log_patches.py,
fusion_titan/training/preflight.py, fusion_titan/infra/torchrun.py."""

import os
import re
import shutil
import subprocess

import pytest

from fusion_titan.bench.train_log import parse_steps
from fusion_titan.training.tb_scalars import read_all_scalars
from trainer_runs import ROOT, SEEDED, run_train  # async_run: tests/conftest.py

pytestmark = pytest.mark.slow

# what torchtitan 0.2.2 prints on a CPU without fusion_titan/infra/log_patches.py
NOISE = ("HF assets path", "lspci", "Peak flops undefined", "fallback to A100", "mfu: 0.00%",
         "UserWarning", "TORCH_NCCL_ASYNC_ERROR_HANDLING", '"_enforced"', "total parameters",
         "Traceback")
STEP_LINE = re.compile(r"step:\s+(\d+)/8\s+loss: ([\d.]+)\s+ce: ([\d.]+)\s+lr: \S+\s+grad_norm:\s+[\d.]+\s+"
                       r"memory:\s+[\d.]+GiB\([\d.]+%\)\s+tps: [\d,]+\s+mfu: n/a\s+eta: (\S+)$", re.M)


def seconds(eta: str) -> int:
    h, m, s = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", eta).groups()
    return 3600 * int(h or 0) + 60 * int(m or 0) + int(s or 0)


def launch_raw(dump, *args):
    env = dict(os.environ, NGPU="1", FUSION_FORCE_CPU="1", PYTHONUNBUFFERED="1")
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--training.seq_len", "64", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def test_one_line_per_step_with_eta_and_no_noise(async_run):
    dump, log = async_run  # 8 steps, log_freq 1, output captured (not a terminal)
    assert "\x1b[" not in log  # no ANSI colour codes in a file or pipe
    for noise in NOISE:
        assert noise not in log, noise
    lines = STEP_LINE.findall(log)
    assert [int(step) for step, *_ in lines] == list(range(1, 9)), log[-4000:]  # one line per step
    etas = [seconds(eta) for *_, eta in lines]
    assert etas[-1] == 0 and etas[0] >= etas[6]
    # the printed loss and CE are the values TensorBoard holds; the extras go to TensorBoard only
    tb = read_all_scalars(dump)
    for step, loss, ce, _ in lines:
        assert float(loss) == pytest.approx(tb["loss_metrics/global_avg_loss"][int(step)], abs=1e-4)
        assert float(ce) == pytest.approx(tb["loss_metrics/ce"][int(step)], abs=1e-4)
    for tag in ("loss_metrics/mtp_1", "moe/max_over_mean_load", "lr/normuon", "data/tokens_per_step"):
        assert sorted(tb[tag]) == list(range(1, 9)), tag
    assert "max_over_mean_load" not in log and "mfu(%)" not in tb  # no fake MFU on CPU
    assert re.search(r"Model debugmodel: 22\.4M parameters, 20\.9M active per token, [\d.]+ GFLOP "
                     r"per token \(training, seq 64\)", log)
    assert f"Starting a new run in {dump}" in log
    parsed = parse_steps(log)  # what scripts/benchmark.py reads back
    assert sorted(parsed) == list(range(1, 9)) and all(v["mfu"] is None for v in parsed.values())


def test_a_finished_run_stops_and_a_resumed_one_says_from_where(async_run, tmp_path):
    dump, _ = async_run
    shutil.copytree(dump / "checkpoint" / "step-6", tmp_path / "checkpoint" / "step-6")
    code, log = launch_raw(tmp_path, "--training.steps", "6")
    assert code == 2, log[-3000:]
    assert f"Nothing to train: {tmp_path}/checkpoint/step-6 is at step 6 and training.steps is 6" in log
    assert "--job.dump_folder" in log and "--checkpoint.no-enable" in log
    assert "Traceback" not in log and "ChildFailedError" not in log and "Training starts" not in log
    log = run_train(tmp_path, "--training.steps", "7", *SEEDED)
    assert (f"Resuming from checkpoint {tmp_path}/checkpoint/step-6: step 6 done, training steps "
            "7-7.") in log
    assert "Training starts at step 7" in log


@pytest.mark.parametrize("args, message", [
    (("--training.stepz", "3"), "Perhaps you meant"),
    (("--model.flavor", "nope"), "unknown model flavor 'nope' for model 'fusion'; choose one of"),
])
def test_a_config_error_is_one_message(tmp_path, args, message):
    code, log = launch_raw(tmp_path, *args)
    assert code == 2 and message in log, log[-3000:]
    for wall in ("Traceback", "ChildFailedError", "FAILED", "Root Cause", "exitcode"):
        assert wall not in log, wall
    assert len(log.splitlines()) <= 20, log
    assert not (tmp_path / "checkpoint").exists()

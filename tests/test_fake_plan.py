"""scripts/fake_plan.py on CPU: rank 0 of an 8-rank plan under torchtitan's fake backend, with
expert parallel 8 (the mirrored token exchange) and owner-sharded NorMuon, trains its steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fake_backend_plan_runs_expert_parallel_8(tmp_path):
    out = tmp_path / "fake"
    env = dict(os.environ, FUSION_FORCE_CPU="1")
    proc = subprocess.run(
        [sys.executable, "scripts/fake_plan.py", "--config", "train_configs/debug_model.toml",
         "--ngpu", "8", "--steps", "2", "--warmup", "0", "--local-batch", "1",
         "--only", "normuon_ep8", "--out", str(out), "--", "--training.seq_len", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads((out / "report.json").read_text())
    assert result["rc"] == 0, result.get("error")
    assert result["peak_gib"] > 0 and result["tps_per_gpu"] > 0
    log = (out / "normuon_ep8" / "fake_plan.log").read_text()
    assert "step:  2" in log

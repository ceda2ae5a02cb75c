"""Does a run resumed mid-way continue the loss curve of the uninterrupted run? (GPU or CPU)

    python scripts/resume_check.py [--config train_configs/fusion_1b.toml] [--steps 50]
        [--out outputs/resume_check] [-- extra overrides ...]

Run A trains --steps steps, writing a full DCP checkpoint at steps/2 and a model-only export
at the end (`last_save_model_only`). Run B is started in the same dump folder with the same
command: auto-resume must skip the export (fusion_titan/checkpoint/manager.py), load the
mid-run checkpoint, and train steps/2+1 .. steps again. Prints, per step, A's and B's loss and
their difference, the peak memory, torch.compile recompilations (TORCH_LOGS=recompiles) and
a JSON summary. On CPU the two curves are bit-identical (tests/test_train.py); on a GPU they
agree within bf16 / atomics noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_titan.bench.train_log import parse_steps, strip_ansi  # noqa: E402


def run(dump: Path, config: str, steps: int, extra: list[str], log: Path) -> str:
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", str(steps),
           "--metrics.log_freq", "1", "--checkpoint.enable", "--checkpoint.interval",
           str(steps // 2), "--checkpoint.last_save_model_only", "--checkpoint.keep_latest_k",
           "0", *extra]
    env = dict(os.environ, CONFIG_FILE=config, TORCH_LOGS="recompiles")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    text = strip_ansi(proc.stdout + proc.stderr)
    log.write_text(text)
    if proc.returncode != 0:
        sys.exit(f"run failed ({log}):\n" + "\n".join(text.splitlines()[-30:]))
    return text


def losses(text: str) -> dict[int, tuple[float, float]]:
    return {step: (m["loss"], m["mem_gib"]) for step, m in parse_steps(text).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/fusion_1b.toml")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="outputs/resume_check")
    ap.add_argument("extra", nargs="*", help="overrides for both runs (after --)")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    dump = out / "run"
    a = run(dump, args.config, args.steps, args.extra, out / "run_a.log")
    b = run(dump, args.config, args.steps, args.extra, out / "run_b.log")
    la, lb = losses(a), losses(b)
    mid = args.steps // 2
    print("| step | loss A (uninterrupted) | loss B (resumed) | B - A | memory A GiB |")
    print("|---|---|---|---|---|")
    diffs = []
    for step in sorted(la):
        if step in lb:
            diffs.append(abs(lb[step][0] - la[step][0]))
        shown_b = f"{lb[step][0]:.5f}" if step in lb else ""
        shown_d = f"{lb[step][0] - la[step][0]:+.5f}" if step in lb else ""
        print(f"| {step} | {la[step][0]:.5f} | {shown_b} | {shown_d} | {la[step][1]:.2f} |")
    summary = {
        "config": args.config, "steps": args.steps, "overrides": args.extra,
        "resumed_from_step": mid, "steps_in_b": sorted(lb),
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "peak_memory_gib": max(m for _, m in la.values()) if la else None,
        "recompiles_a": a.count("Recompiling function"),
        "skipped_export_warning": "resume skips" in b,
    }
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if sorted(lb) != list(range(mid + 1, args.steps + 1)):
        sys.exit(f"run B did not resume from step {mid}: it logged steps {sorted(lb)}")


if __name__ == "__main__":
    main()

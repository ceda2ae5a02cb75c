"""Train debug_model.toml with several optimizers, same steps and tokens (default: NorMuon +
CautiousAdamW and AdamW; `--optimizers` picks from NorMuon, Muon, AdamW, Adam).

    python scripts/compare_optimizers.py [--steps 60] [--optimizers NorMuon Muon AdamW]
                                         [--out outputs/optimizer_comparison]

Runs the real trainer (run_train.sh) once per optimizer, reads the logged losses back from
TensorBoard and prints a table (loss at a few steps, mean of the last 10) plus seconds per step.
Each optimizer keeps its own learning rates from the TOML ([optimizer] lr, muon_lr).
"""

import argparse
import os
import subprocess
import time
from pathlib import Path

from fusion_titan.training.optimizer import OPTIMIZERS
from fusion_titan.training.tb_scalars import read_scalars

ROOT = Path(__file__).resolve().parents[1]


def train(name: str, steps: int, out: Path, extra: list[str]) -> tuple[dict[int, float], float]:
    dump = out / name
    cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", str(steps),
           "--optimizer.name", name, "--metrics.log_freq", "1", "--checkpoint.no-enable", *extra]
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, NGPU="1"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_scalars(dump, "loss_metrics/ce"), (time.time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=["NorMuon", "AdamW"],
                        help="[optimizer] name of each run, in table order")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "optimizer_comparison")
    parser.add_argument("extra", nargs="*", help="more run_train.sh overrides, after --")
    opts = parser.parse_args()
    results = {name: train(name, opts.steps, opts.out, opts.extra) for name in opts.optimizers}
    marks = [s for s in (1, 10, 20, 30, 40, 50, opts.steps) if s <= opts.steps]
    print("| optimizer | " + " | ".join(f"CE @ {s}" for s in marks) + " | mean CE, last 10 | s/step (wall) |")
    print("|---|" + "---|" * (len(marks) + 2))
    for name, (losses, sec) in results.items():
        last = [losses[s] for s in range(opts.steps - 9, opts.steps + 1)]
        print(f"| {name} | " + " | ".join(f"{losses[s]:.3f}" for s in marks)
              + f" | {sum(last) / len(last):.3f} | {sec:.1f} |")


if __name__ == "__main__":
    main()

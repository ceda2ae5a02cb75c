"""Plot a training run from its TensorBoard event files: one PNG per figure.

    python scripts/plot_run.py outputs/debug_model               # writes outputs/debug_model/plots/*.png
    python scripts/plot_run.py outputs/debug_model --out plots/   # elsewhere

RUN_DIR is the run's dump folder (`[job] dump_folder`; events under its `[metrics]
save_tb_folder`, "tb"). Figures, over optimizer steps: loss.png (loss, CE, each MTP depth,
validation CE), lr.png (every parameter group), grad_norm.png, tokens_per_second.png and
expert_load.png (max / mean and min / mean tokens per expert, routing entropy). A figure whose
metrics were not logged (no MoE, no validation) is skipped or drawn without them. For live
curves: tensorboard --logdir RUN_DIR/tb.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fusion_titan.training.tb_scalars import read_all_scalars  # noqa: E402

# figure file -> (title, y label, log scale, [(tag or tag regex, legend label)])
FIGURES = {
    "loss.png": ("Training loss", "nats per token", False, [
        ("loss_metrics/global_avg_loss", "loss (minimized: CE + MTP + balance terms)"),
        ("loss_metrics/ce", "CE (next token)"),
        (re.compile(r"loss_metrics/mtp_(\d+)$"), "MTP depth {0}"),
        ("validation_metrics/loss", "validation CE"),
    ]),
    "lr.png": ("Learning rate", "lr", True, [(re.compile(r"lr/(.+)"), "{0}")]),
    "grad_norm.png": ("Gradient norm (before clipping)", "L2 norm", True, [("grad_norm", "grad norm")]),
    "tokens_per_second.png": ("Throughput", "tokens / s per device", False,
                              [("throughput(tps)", "tokens/s")]),
    "expert_load.png": ("Expert load balance (MoE layers)", "tokens per expert / mean", False, [
        ("moe/max_over_mean_load", "max / mean, worst layer"),
        ("moe/mean_max_over_mean_load", "max / mean, layer average"),
        ("moe/min_over_mean_load", "min / mean, worst layer"),
        ("moe/routing_entropy", "routing entropy (normalized)"),
    ]),
}


def series(scalars: dict[str, dict[int, float]], spec) -> list[tuple[str, dict[int, float]]]:
    """The (label, {step: value}) curves one FIGURES entry selects."""
    tag, label = spec
    if isinstance(tag, str):
        return [(label, scalars[tag])] if scalars.get(tag) else []
    found = [(tag.fullmatch(name), name) for name in sorted(scalars)]
    return [(label.format(*m.groups()), scalars[name]) for m, name in found if m and scalars[name]]


def plot_run(run_dir: Path, out: Path, tb_folder: str = "tb") -> list[Path]:
    scalars = read_all_scalars(run_dir, tb_folder)
    if not scalars:
        raise SystemExit(f"no TensorBoard scalars under {run_dir / tb_folder} (is [metrics] "
                         "enable_tensorboard on, and is RUN_DIR the run's dump_folder?)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel, log_y, specs) in FIGURES.items():
        curves = [curve for spec in specs for curve in series(scalars, spec)]
        if not curves:
            print(f"skipped {name}: not logged in this run")
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, points in curves:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o" if len(steps) < 30 else None,
                    markersize=3, label=label)
        ax.set(title=f"{title}: {run_dir.name}", xlabel="step", ylabel=ylabel)
        if log_y and all(v > 0 for _, points in curves for v in points.values()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
        print(f"wrote {out / name}")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="the run's dump folder (holds tb/)")
    ap.add_argument("--out", type=Path, default=None, help="where the PNGs go (default RUN_DIR/plots)")
    ap.add_argument("--tb-folder", default="tb", help="[metrics] save_tb_folder of the run")
    args = ap.parse_args(argv)
    return plot_run(args.run_dir, args.out or args.run_dir / "plots", args.tb_folder)


if __name__ == "__main__":
    main()

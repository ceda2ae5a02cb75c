"""A sweep's report: one markdown table (mean and spread over seeds), failures, and the plots.

Plots (one line per variant, the mean over its seeds, the band spanning min..max of the seeds):
held-out CE vs training FLOPs (`heldout_vs_flops.png`) and vs steady-state training seconds
(`heldout_vs_wallclock.png`, step 1's compilation excluded; see runner.py). Where each run's
wall time went (startup, training, evaluation, shutdown: timing.py) has its own table. A partial
report (a sweep still running, or cut short) names the runs that have not run yet.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .runner import INTERRUPTED, replaced_atomically  # noqa: E402

PLOTS = {"heldout_vs_flops.png": ("flops", "training FLOPs"),
         "heldout_vs_wallclock.png": ("seconds", "training seconds (after step 1)")}
NOT_RUN = "not run"  # the status of a planned run with no outcome yet
PHASES = ("wall", "init", "first_step", "startup", "train", "eval", "shutdown")


def spread(values: list[float | None], fmt: str) -> str:
    """'mean ± sample std' over seeds ('mean' for one seed, 'n/a' when not measured)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def by_variant(results: list[dict], order: list[str]) -> dict[str, list[dict]]:
    groups = {name: [] for name in order}
    for r in results:
        groups.setdefault(r["variant"], []).append(r)
    return groups


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def timing_table(results: list[dict]) -> list[str]:
    """One row per run that ended: its seconds per phase (timing.py)."""
    timed = [r for r in results if r.get("timing")]
    if not timed:
        return []
    lines = ["", "## Where the time went", "",
             "Seconds per run, from the trainer's log timestamps: startup = init (launcher, imports, "
             "data, model build) + step 1 (autotuning, compilation); train excludes evaluations; "
             "shutdown = last line to process exit.", "",
             "| run | status | GPU(s) | " + " | ".join(PHASES) + " |", "|---|---|---|" + "---|" * len(PHASES)]
    for r in timed:
        lines.append(f"| {r['variant']} seed {r['seed']} | {r['status']} | {r.get('gpus', 'visible')} | "
                     + " | ".join(seconds(r["timing"].get(k)) for k in PHASES) + " |")
    return lines


def markdown(title: str, header_lines: list[str], results: list[dict], order: list[str],
             plots: list[str], missing: list[tuple[str, int]] = ()) -> str:
    """The report; missing: the (variant, seed) runs planned that have no outcome yet."""
    ok = [r for r in results if r["status"] == "ok"]
    planned = len(results) + len(missing)
    partial = ([f"**Partial: {len(results)} of {planned} runs ended; not run yet: "
                + ", ".join(f"{v} seed {s}" for v, s in missing) + ".**", ""] if missing else [])
    lines = [f"# {title}", "", *header_lines, "", *partial,
             "| variant | seeds ok | params total | active | GFLOP/token | steps | tokens | training FLOPs "
             "| tokens/s | MFU % | final train loss | final train CE | held-out CE | held-out perplexity "
             "| wall s (startup + train + eval) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_variant(ok, order).items():
        tried = sum(1 for r in results if r["variant"] == name) + sum(1 for v, _ in missing if v == name)
        if not runs:
            lines.append(f"| {name} | 0/{tried} |" + " |" * 13)
            continue
        r0 = runs[0]
        col = lambda key, fmt: spread([r[key] for r in runs], fmt)  # noqa: E731
        lines.append(
            f"| {name} | {len(runs)}/{tried} | {count(r0['params_total'])} | {count(r0['params_active'])} "
            f"| {r0['flops_per_token'] / 1e9:.3f} | {r0['steps']} | {r0['tokens']:,} | {r0['flops']:.3e} "
            f"| {col('tokens_per_second', ',.0f')} | {col('mfu_percent', '.1f')} "
            f"| {col('final_train_loss', '.4f')} | {col('final_train_ce', '.4f')} | {col('heldout_ce', '.4f')} "
            f"| {col('heldout_perplexity', '.2f')} | {wall_column(runs)} |")
    lines += ["", "Mean ± sample standard deviation over the seeds that finished. tokens/s (all devices) "
              "and MFU: steady state (step 1, with compilation, excluded). Train loss: what is "
              "minimized (CE + MTP and balance terms); train CE: next-token CE alone, comparable "
              "across MTP depths."]
    lines += timing_table(results)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            cut = ", interrupted: it trains again when the sweep is resumed" if r["status"] == INTERRUPTED else ""
            lines += [f"### {r['variant']}, seed {r['seed']} (exit code {r.get('exit_code')}{cut})", "",
                      "```", *r.get("log_tail", [r.get("error", "")]), "```", ""]
    if plots:
        lines += ["", "## Plots", "", *[f"![{p}](plots/{p})" for p in plots]]
    return "\n".join(lines) + "\n"


def wall_column(runs: list[dict]) -> str:
    """'wall (startup + train + eval)', means over the seeds, in seconds."""
    def mean(key):
        values = [r["timing"][key] for r in runs if r.get("timing") and r["timing"].get(key) is not None]
        return statistics.mean(values) if values else None
    startup, train, evaluation = (seconds(mean(k)) for k in ("startup", "train", "eval"))
    return f"{seconds(mean('wall'))} ({startup} + {train} + {evaluation})"


def plot(results: list[dict], order: list[str], out: Path) -> list[str]:
    """The PNGs of PLOTS under out/ (those with at least one finished run); their names."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (x_key, x_label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for name, runs in by_variant(ok, order).items():
            if not runs:
                continue
            # every seed of a variant evaluates at the same steps; average x and y per step
            steps = sorted({p["step"] for p in runs[0]["curve"]})
            xs, mean, lo, hi = [], [], [], []
            for s in steps:
                points = [p for r in runs for p in r["curve"] if p["step"] == s]
                if any(p[x_key] is None for p in points):
                    continue
                ys = [p["heldout_ce"] for p in points]
                xs.append(statistics.mean(p[x_key] for p in points))
                mean.append(statistics.mean(ys))
                lo.append(min(ys))
                hi.append(max(ys))
            line, = ax.plot(xs, mean, marker="o", markersize=3, label=f"{name} ({len(runs)} seed(s))")
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set(title=f"Held-out CE vs {x_label}", xlabel=x_label, ylabel="held-out CE (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with replaced_atomically(out / filename) as partial:  # a cut sweep keeps the last one
            fig.savefig(partial, dpi=110, format="png")
        plt.close(fig)
        written.append(filename)
    return written

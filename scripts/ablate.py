"""Run an ablation sweep at equal training FLOPs and report it (docs/ablations.md).

    python scripts/ablate.py train_configs/ablations/debug_sweep.toml --out outputs/ablations/debug
    python scripts/ablate.py SWEEP --out DIR --dry-run          # the step counts only, trains nothing
    python scripts/ablate.py SWEEP --out DIR --seeds 0 1 2 --budget-tokens 2e6
    python scripts/ablate.py SWEEP --out DIR --archive OUT/sweep.tgz   # DIR as one tarball too
    python scripts/ablate.py SWEEP --out DIR --jobs 3                  # 3 runs at once
    python scripts/ablate.py SWEEP --out DIR --ngpu 1 --jobs 4         # 2 GPUs: 2 one-GPU runs on each

Each variant x seed trains through run_train.sh (`jobs` of them at once, else one after
another) for the steps that spend the sweep's FLOPs budget (fusion_titan/ablation/plan.py),
evaluating the held-out data at step 1 and at `eval_points` evenly spaced steps. Writes
DIR/report.md, DIR/plots/*.png, DIR/manifest.json and one folder per run under DIR/runs/; all but
the run folders are rewritten before the first run and after every run, so a sweep cut short
keeps what ended (the report names the runs still missing); --archive FILE rewrites one .tar.gz
of DIR after every run too. Re-running the same command skips every run that already ended
(identified by a hash of its TOML, overrides, seed and GPU count); --retry-failed reruns failures.
On a machine with room for several runs' GPUs, runs trained at once go to disjoint GPUs
(fusion_titan/ablation/placement.py).
Exit code 0 when every run finished, 1 when one failed (the report has its log's last lines),
2 for a sweep that cannot start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusion_titan.ablation import provenance  # noqa: E402
from fusion_titan.ablation.placement import SlotPool, gpu_slots, visible_devices  # noqa: E402
from fusion_titan.ablation.plan import budget_flops, default_ngpu, plan_variant  # noqa: E402
from fusion_titan.ablation.report import NOT_RUN, markdown, plot  # noqa: E402
from fusion_titan.ablation.runner import (  # noqa: E402
    STOPPING, execute, finished, replaced_atomically, run_folder, write_atomic,
)
from fusion_titan.ablation.sweep import SweepError, load_sweep  # noqa: E402
from fusion_titan.data.shards import MANIFEST  # noqa: E402
from fusion_titan.training.preflight import ConfigError  # noqa: E402


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="sweep file (.toml or .json)")
    ap.add_argument("--out", type=Path, required=True, help="where runs, report, plots, manifest go")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--budget-tokens", type=float, help="replaces the sweep's budget: tokens of the base")
    budget.add_argument("--budget-flops", type=float, help="replaces the sweep's budget: FLOPs per run")
    ap.add_argument("--seeds", type=int, nargs="+", help="replaces the sweep's seeds")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="run these variants only")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    ap.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    ap.add_argument("--jobs", type=int, help="replaces the sweep's jobs: runs trained at once on this machine")
    ap.add_argument("--ngpu", type=int, help="replaces the sweep's ngpu: GPUs (processes) per run")
    ap.add_argument("--archive", type=Path, metavar="FILE",
                    help="after every run, write the whole --out directory as one .tar.gz here")
    return ap.parse_args(argv)


def load(opts):
    sweep = load_sweep(opts.sweep)
    changes = {}
    if opts.budget_tokens is not None:
        changes.update(budget_tokens=opts.budget_tokens, budget_flops=None)
    if opts.budget_flops is not None:
        changes.update(budget_flops=opts.budget_flops, budget_tokens=None)
    if opts.seeds:
        changes["seeds"] = tuple(opts.seeds)
    if opts.jobs is not None:
        if opts.jobs < 1:
            raise SweepError(f"--jobs {opts.jobs}: give the number of runs to train at once, >= 1")
        changes["jobs"] = opts.jobs
    if opts.ngpu is not None:
        if opts.ngpu < 0:
            raise SweepError(f"--ngpu {opts.ngpu}: give the GPUs per run (0 = run_train.sh's default)")
        changes["ngpu"] = opts.ngpu
    config = ROOT / sweep.config
    if not config.is_file():
        raise SweepError(f"{sweep.path}: config {sweep.config!r} is not a file under {ROOT}")
    changes["config"] = str(config)
    if sweep.val_data:
        val = Path(sweep.val_data).resolve()
        if not (val / MANIFEST).is_file():
            raise SweepError(f"{sweep.path}: val_data {sweep.val_data!r} holds no prepared data; make it "
                             f"with: python scripts/prepare_data.py --out {sweep.val_data} --source "
                             "NAME=TEXT_FILES --val-fraction 1.0 (docs/ablations.md)")
        changes["val_data"] = str(val)
    sweep = dataclasses.replace(sweep, **changes)
    if opts.only:
        names = {v.name for v in sweep.variants}
        unknown = sorted(set(opts.only) - names)
        if unknown:
            raise SweepError(f"--only {unknown}: no such variant; the sweep has {sorted(names)}")
        sweep = dataclasses.replace(sweep, variants=tuple(v for v in sweep.variants if v.name in opts.only))
    return sweep


def config_failure(variant: str, seed: int, error: Exception) -> dict:
    return {"status": "failed", "variant": variant, "seed": seed, "run_id": None,
            "exit_code": "config", "log_tail": str(error).splitlines()[-25:]}


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    try:
        sweep = load(opts)
        ngpu = sweep.ngpu or default_ngpu()
        budget = budget_flops(sweep, ngpu)
    except (SweepError, ConfigError, ValueError) as error:
        print(f"ablate: {error}", file=sys.stderr)
        return 2
    print(f"{sweep.path}: budget {budget:.4e} training FLOPs per run, seeds {list(sweep.seeds)}, "
          f"{ngpu} GPU(s)/process(es) per run, {sweep.jobs} run(s) at once")
    plans, results = [], []
    for variant in sweep.variants:
        try:
            runs = plan_variant(sweep, variant, budget, ngpu, sweep.val_data)
        except (ConfigError, ValueError, KeyError) as error:
            print(f"  {variant.name}: cannot be built: {error}")
            results += [config_failure(variant.name, s, error) for s in sweep.seeds]
            continue
        p = runs[0]
        print(f"  {variant.name}: {p.shape.flops_per_token / 1e9:.3f} GFLOP/token x "
              f"{p.shape.tokens_per_step:,} tokens/step -> {p.steps} steps ({p.flops:.4e} FLOPs, "
              f"{100 * (p.flops / budget - 1):+.2f}% of the budget), held-out every {p.eval_every}")
        plans += runs
    if opts.dry_run:
        return 0
    # seed-major: a sweep cut short (a time-limited device call) has one seed of every variant first
    plans.sort(key=lambda plan: list(sweep.seeds).index(plan.seed))

    pool = SlotPool(gpu_slots(visible_devices(gpu_count()), ngpu), sweep.jobs)
    if pool.slots:
        print(f"placement (CUDA_VISIBLE_DEVICES): {pool.describe(sweep.jobs)}")
    stop_on_signals()
    results = run_sweep(opts.out, sweep, budget, ngpu, plans, results, opts.retry_failed, opts.archive,
                        pool)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def stop_on_signals() -> None:
    """Ctrl-C / `timeout -s INT` (a device call's limit): SIGINT reaches the runs training now
    too (one process group); STOPPING is set first, so they are reported interrupted and train
    again on resume (not failed, which would need --retry-failed); then KeyboardInterrupt stops
    the sweep as Python's own handler would. Other signals keep their default."""
    def stop(signum, frame):
        STOPPING.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_sweep(out: Path, sweep, budget: float, ngpu: int, plans, results: list[dict],
              retry_failed: bool = False, archive: Path | None = None,
              pool: SlotPool | None = None) -> list[dict]:
    """Train (or skip) every plan in order; the outputs are rewritten before the first run and
    after each one, so whatever cuts the sweep short leaves the report of the runs that ended.
    `pool` places concurrent runs on disjoint GPUs (default: no placement)."""
    pool = pool or SlotPool([], sweep.jobs)

    def publish():
        write_outputs(out, sweep, budget, ngpu, plans, results, pool.describe(sweep.jobs))
        if archive is not None:
            try:
                write_archive(out, archive)
            except (OSError, tarfile.TarError) as error:  # a run folder changed under tar (jobs > 1)
                print(f"archive not updated this time ({error}); the next run's update retries", flush=True)
        ended = sum(1 for r in results if r.get("exit_code") != "config")
        print(f"wrote {out / 'report.md'}, {out / 'manifest.json'}, {out / 'plots'}/"
              + (f", {archive}" if archive else "") + f" ({ended} of {len(plans)} runs ended)", flush=True)

    lock = threading.Lock()  # results and outputs: one writer at a time

    def train(plan):
        folder = run_folder(out, plan)
        done = finished(folder, retry_failed)
        if done is not None:
            print(f"skipped ({done['status']} before): {plan.name}", flush=True)
        else:
            with pool.env() as env:
                print(f"training {plan.name}: {plan.steps} steps"
                      + (f" on GPU(s) {env['CUDA_VISIBLE_DEVICES']}" if env else "") + " ...", flush=True)
                done = execute(plan, sweep.config, out, ROOT, ngpu, sweep.timeout_s, extra_env=env)
            print(f"  {plan.name}: {done['status']}"
                  + (f": held-out CE {done['heldout_ce']:.4f}" if done["status"] == "ok"
                     else f" (exit code {done['exit_code']}), see {folder}/train.log")
                  + (f"; {timing_line(done['timing'])}" if done.get("timing") else ""), flush=True)
        with lock:
            results.append(done)
            publish()

    out.mkdir(parents=True, exist_ok=True)
    publish()
    if sweep.jobs == 1:
        for plan in plans:
            train(plan)
    else:  # threads only wait on their run_train.sh processes; the plans start in order
        with ThreadPoolExecutor(sweep.jobs) as threads:
            list(threads.map(train, plans))
    return results


def timing_line(timing: dict) -> str:
    shown = ", ".join(f"{k} {timing[k]:.1f}" for k in ("startup", "train", "eval", "shutdown")
                      if timing.get(k) is not None)
    return f"{timing['wall']:.1f} s ({shown})"


def write_archive(out: Path, archive: Path) -> None:
    """out/ as archive (a .tar.gz whose top folder is out's name), replaced atomically."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(archive) as partial:
        base, skip = out.resolve(), {archive.resolve(), partial.resolve()}
        with tarfile.open(partial, "w:gz") as tar:  # (an archive inside out/ is not put in itself)
            tar.add(base, arcname=base.name,
                    filter=lambda info: None if base.parent / info.name in skip else info)


def write_outputs(out: Path, sweep, budget: float, ngpu: int, plans, results, sharing: str = "") -> None:
    order = [v.name for v in sweep.variants]
    outcome = {(r["variant"], r["seed"]): r for r in results}
    git = provenance.git_state(ROOT)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sweep_file": str(sweep.path),
        "sweep_text": sweep.text, "budget_flops": budget, "seeds": list(sweep.seeds),
        "git": git, "packages": provenance.package_versions(), "device": provenance.device_name(),
        "ngpu": ngpu, "jobs": sweep.jobs, "placement": sharing, "base_toml": sweep.config,
        "base_toml_text": Path(sweep.config).read_text(),
        "runs": [{
            "variant": p.variant, "seed": p.seed, "run_id": p.run_id, "folder": str(run_folder(out, p)),
            "status": outcome.get((p.variant, p.seed), {"status": NOT_RUN})["status"], "steps": p.steps,
            "timing": outcome.get((p.variant, p.seed), {}).get("timing"),
            "command": ["./run_train.sh", "--job.dump_folder", str(run_folder(out, p).resolve()), *p.args],
            "env": {"CONFIG_FILE": sweep.config, "NGPU": str(ngpu)},
            "data": provenance.data_checksums(p.resolved["data"]), "resolved_config": p.resolved,
        } for p in plans],
        "config_failures": [r for r in results if r.get("exit_code") == "config"],
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, default=str))
    plots = plot(results, order, out / "plots")
    missing = [(p.variant, p.seed) for p in plans if (p.variant, p.seed) not in outcome]
    header = [f"Sweep `{sweep.path}` on `{Path(sweep.config).name}`, {budget:.4e} training FLOPs per run, "
              f"seeds {list(sweep.seeds)}, {provenance.device_name()}, commit "
              f"{(git['commit'] or 'unknown')[:12]}{' (dirty)' if git['dirty'] else ''}."]
    if sharing:
        header += ["", sharing]
    header += [""]
    header += [f"- `{v.name}`: `{' '.join(v.overrides) or '(base)'}`" + (f" — {v.description}" if v.description else "")
               for v in sweep.variants]
    write_atomic(out / "report.md", markdown("Ablation report", header, results, order, plots, missing))


if __name__ == "__main__":
    sys.exit(main())

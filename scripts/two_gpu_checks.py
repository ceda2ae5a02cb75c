"""Two GPUs against one: same losses, per-GPU throughput, and checkpoints under kill -9.

    python scripts/two_gpu_checks.py [--config train_configs/fusion_1b.toml] [--steps 20]
        [--parts same,throughput,faults,resume] [--out outputs/two_gpu] [-- extra overrides]

Every run starts from one seed checkpoint (torchtitan's `--checkpoint.create_seed_checkpoint`,
written by one process and copied in as `step-0`) and trains the same global batch: 2 x the
local batch, as 2 micro-batches on one GPU or one per GPU on two.

- same: 1 GPU, FSDP 2 and FSDP 2 x EP 2 (the TOML's optimizer); per-step losses compared with
  the 1-GPU run (max relative difference) and plotted (same_losses.png).
- throughput: the same three runs with NorMuon; per-GPU tokens/s of every run vs its 1-GPU run,
  and vs a 1-GPU run without accumulation (`one_gpu_no_accum`: one local batch per optimizer
  step, the per-GPU work of a 2-GPU step; with "same" in --parts the AdamW runs get it too).
  Every run also reports, over the measured steps, the busiest expert-parallel rank's load over
  the ranks' mean (`moe/mean_max_over_mean_ep_rank_load`, EP runs: each MoE layer's all-to-all
  waits for that rank, so routing that drifts out of balance slows EP runs only) and the
  allocator's retries (`memory/num_alloc_retries`).
- faults: FSDP 2 with asynchronous checkpoints every `steps/4` steps; a second identical run is
  killed with SIGKILL (torchrun and both ranks) as soon as the second checkpoint's folder
  appears, i.e. during its asynchronous save, then restarted with the same command: it must
  resume from the last complete checkpoint and log the uninterrupted run's losses.
- resume: a 2-GPU run's middle checkpoint resumes on 1 GPU, and a 1-GPU run's on 2 GPUs, each
  compared with the run that wrote it (the 2-GPU writer is the faults part's uninterrupted run
  when that part ran).

`--runs NAME,...` trains these runs instead of the two parts' defaults (and, without --parts, no
other part), e.g. `--runs one_gpu,fsdp2,fsdp2_noreshard,one_gpu_normuon,fsdp2_noreshard_normuon`:
`fsdp2_noreshard` keeps the gathered parameters from forward to backward
(`--parallelism.fsdp_reshard_after_forward never`). The list needs the 1-GPU run of each
optimizer it names (`one_gpu`, `one_gpu_normuon`); per optimizer (in the order first named), the
1-GPU runs train first, then the 2-GPU runs in the listed order.

Writes report.json and same_losses.png under --out; prints a summary. `--archive FILE` also packs
the summaries and every run's log into one .tar.gz (a device call returns only a few files).

Profiling one run's step (e.g. why NorMuon loses more than AdamW to expert parallel):

    python scripts/two_gpu_checks.py --profile fsdp2_ep2_normuon [--steps 12] [--flat] [--out DIR]

`--profile RUN` (one_gpu, one_gpu_no_accum, fsdp2, fsdp2_ep2 or fsdp2_noreshard, with `_normuon` for NorMuon; comma-separate
several) trains that run from the seed checkpoint with torchtitan's profiler on step
`steps - 1` and writes `profile_<RUN>.md` at the top of --out, per rank: step time, GPU-busy
time, the optimizer step's host time and the GPU time / count of the kernels it launched, NCCL
time inside and outside it, host syncs and cudaMalloc/cudaFree calls inside and outside it, and
the top kernels of the step and of the optimizer (fusion_titan/bench/trace_summary.py). Given
alone, --profile runs no other part (add --parts to run them too). `--flat` leaves only flat
files at the top of --out (each run's log copied there; the seed, run folders and traces
deleted): what a device output folder needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_titan.bench.trace_summary import (  # noqa: E402
    PROFILE_FOLDER, format_ranks, profiler_overrides, summarize_ranks,
)
from fusion_titan.bench.train_log import parse_steps, strip_ansi  # noqa: E402
from fusion_titan.training.tb_scalars import read_all_scalars  # noqa: E402

EP2 = ["--parallelism.expert_parallel_degree", "2"]
NORMUON = ["--optimizer.name", "NorMuon"]
# run name -> (GPUs, local batches per optimizer step, overrides); "<name>_normuon" is the same
# run with NorMuon. one_gpu trains the 2-GPU runs' global batch as 2 micro-batches (the same
# losses); one_gpu_no_accum trains one local batch per optimizer step, the work each GPU of a
# 2-GPU run does between optimizer steps: per-GPU throughput at the same per-GPU work, where
# per-step costs (the optimizer step, above all NorMuon's) fall on the same tokens.
RUNS = {"one_gpu": (1, 2, []), "one_gpu_no_accum": (1, 1, []), "fsdp2": (2, 2, []),
        "fsdp2_ep2": (2, 2, EP2),
        # FSDP keeping the gathered parameters from forward to backward: one all-gather per step
        "fsdp2_noreshard": (2, 2, ["--parallelism.fsdp_reshard_after_forward", "never"])}


def default_runs(parts: set[str]) -> list[str]:
    """The runs of the same / throughput parts, 1-GPU references first for each optimizer."""
    tags = ([""] if "same" in parts else []) + (["_normuon"] if "throughput" in parts else [])
    return [name + tag for tag in tags for name in
            ["one_gpu"] + (["one_gpu_no_accum"] if "throughput" in parts else []) + ["fsdp2", "fsdp2_ep2"]]


def check_runs(names: list[str]) -> None:
    """Refuse an unknown or repeated name, or runs of an optimizer without its 1-GPU reference
    (every run of an optimizer is compared with it, and it is trained first)."""
    for name in names:
        named_run(name)
        if names.count(name) > 1:
            raise SystemExit(f"--runs {name}: listed twice (each run trains once into its own folder)")
        ref = "one_gpu" + optimizer_tag(name)
        if ref not in names:
            raise SystemExit(f"--runs {name}: add {ref} (its losses and tokens/s are compared with it)")


def optimizer_tag(name: str) -> str:
    """"_normuon" for a run with NorMuon, "" for one with the TOML's optimizer."""
    return "_normuon" if name.endswith("_normuon") else ""


def named_run(name: str) -> tuple[int, int, list[str]]:
    """(GPUs, local batches per optimizer step, overrides) of a run of the same / throughput parts."""
    tag = optimizer_tag(name)
    base = name[:len(name) - len(tag)]
    if base not in RUNS:
        choices = ", ".join(f"{n}, {n}_normuon" for n in RUNS)
        raise SystemExit(f"{name}: unknown run; choose from {choices}")
    ngpu, batches, extra = RUNS[base]
    return ngpu, batches, (NORMUON if tag else []) + extra


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = ROOT / args.out
        self.seed = self.out / "seed" / "checkpoint" / "step-0"

    def command(self, dump: Path, extra: list[str], batches: int = 2) -> list[str]:
        """The trainer's command line; the global batch is `batches` local batches."""
        a = self.args
        return ["./run_train.sh", "--job.dump_folder", str(dump), "--training.steps", str(a.steps),
                "--metrics.log_freq", "1", "--training.local_batch_size", str(a.local_batch),
                "--training.global_batch_size", str(batches * a.local_batch), *a.extra, *extra]

    def env(self, ngpu: int) -> dict:
        return dict(os.environ, CONFIG_FILE=self.args.config, NGPU=str(ngpu), PYTHONUNBUFFERED="1")

    def make_seed(self) -> None:
        if (self.seed / ".metadata").is_file():
            return
        dump = self.out / "seed"
        cmd = ["./run_train.sh", "--job.dump_folder", str(dump), "--checkpoint.enable",
               "--checkpoint.create_seed_checkpoint", "--checkpoint.last_save_model_only",
               "--checkpoint.async_mode", "disabled", "--compile.no-enable", *self.args.extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env(1), capture_output=True, text=True)
        (self.out / "seed.log").write_text(strip_ansi(proc.stdout + proc.stderr))
        if proc.returncode != 0 or not (self.seed / ".metadata").is_file():
            sys.exit(f"seed checkpoint failed: see {self.out / 'seed.log'}")

    def prepare(self, name: str, from_checkpoint: Path | None = None) -> Path:
        """A fresh dump folder holding the seed (copied) or `from_checkpoint` (moved: a full
        fusion_1b checkpoint is ~17 GB, and the writer's losses stay in its TensorBoard)."""
        dump = self.out / name
        shutil.rmtree(dump, ignore_errors=True)
        (dump / "checkpoint").mkdir(parents=True)
        if from_checkpoint is None:
            shutil.copytree(self.seed, dump / "checkpoint" / self.seed.name)
        else:
            shutil.move(from_checkpoint, dump / "checkpoint" / from_checkpoint.name)
        return dump

    def train(self, name: str, ngpu: int, extra: list[str], dump: Path | None = None,
              kill_at: Path | None = None, batches: int = 2) -> dict:
        """One run; with kill_at, SIGKILL the whole run as soon as that folder appears."""
        dump = dump or self.prepare(name)
        t0 = time.time()
        log_path = dump / f"{name}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(self.command(dump, extra, batches), cwd=ROOT, env=self.env(ngpu),
                                    stdout=log_file, stderr=subprocess.STDOUT)
            killed = None
            if kill_at is not None:
                while proc.poll() is None and not kill_at.exists():
                    time.sleep(0.01)
                if proc.poll() is None:
                    # every rank and torchrun at once, no cleanup: what a node failure leaves
                    victims = descendants(proc.pid) + [proc.pid]
                    for pid in victims:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    killed = {"processes": len(victims),
                              "metadata_written": (kill_at / ".metadata").exists()}
            proc.wait()
        log = strip_ansi(log_path.read_text())
        steps = parse_steps(log)
        scalars = read_all_scalars(dump)
        measured = [v["tps"] for s, v in steps.items() if s > self.args.warmup]
        result = {"name": name, "ngpu": ngpu, "extra": " ".join(extra), "rc": proc.returncode,
                  "wall_s": round(time.time() - t0, 1),
                  "losses": {int(k): v for k, v in
                             scalars.get("loss_metrics/global_avg_loss", {}).items()},
                  "tps_per_gpu": statistics.mean(measured) if measured else None,
                  "peak_gib": max((v["mem_gib"] for v in steps.values()), default=None),
                  **self.step_stats(scalars)}
        resumed = [ln for ln in log.splitlines() if "Training starts at step" in ln]
        result["starts_at"] = resumed[-1].split("step")[-1].strip(" .") if resumed else None
        if killed is not None:
            result["killed"] = killed
        if proc.returncode not in (0, -signal.SIGKILL) and killed is None:
            result["error"] = " | ".join(log.splitlines()[-8:])[-1000:]
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        return result


    def step_stats(self, scalars: dict[str, dict[int, float]]) -> dict:
        """From the run's TensorBoard, over the measured steps: the mean busiest-EP-rank load
        over the ranks' mean (each MoE layer's all-to-all waits for that rank; EP runs only) and
        the allocator's retries (cudaFree-and-retry; a fragmented cache) during those steps: the
        counter is cumulative over the process, so the last value minus the one at the warm-up's
        last logged step."""
        out = {}
        load = scalars.get("moe/mean_max_over_mean_ep_rank_load", {})
        measured = [v for s, v in load.items() if s > self.args.warmup]
        if measured:
            out["ep_rank_load_max_over_mean"] = statistics.mean(measured)
        retries = scalars.get("memory/num_alloc_retries", {})
        if any(s > self.args.warmup for s in retries):
            before = [v for s, v in sorted(retries.items()) if s <= self.args.warmup]
            out["alloc_retries"] = retries[max(retries)] - (before[-1] if before else 0.0)
        return out


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun's workers run in their own process groups)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def flatten(out: Path) -> None:
    """Only flat files left at the top of `out`: each run's log copied up, every folder
    (seed checkpoint, run dumps, traces) deleted."""
    for folder in [p for p in out.iterdir() if p.is_dir()]:
        log = folder / f"{folder.name}.log"
        if log.is_file():
            shutil.copy(log, out / log.name)
        shutil.rmtree(folder)


def pack(out: Path, archive: Path) -> None:
    """The summaries in one .tar.gz: the top-level files of `out` and each run's log (no
    checkpoints, no traces). A device call returns only a few files; this is one."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(out.iterdir()):
            log = path / f"{path.name}.log"
            if path.is_file() and path.resolve() != archive.resolve():
                tar.add(path, arcname=path.name)
            elif path.is_dir() and log.is_file():
                tar.add(log, arcname=log.name)


def max_rel(a: dict, b: dict, steps) -> float | None:
    common = [s for s in steps if s in a and s in b]
    if not common:
        return None
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in common)


def plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps = sorted(r["losses"])
        ax.plot(steps, [r["losses"][s] for s in steps], marker=".", label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("same global batch on 1 and 2 GPUs, one seed checkpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/fusion_1b.toml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from tokens/s")
    ap.add_argument("--local-batch", type=int, default=4)
    ap.add_argument("--parts", default=None,
                    help="default: same,throughput,faults,resume (none when --profile is given)")
    ap.add_argument("--profile", default="", help="comma list of run names to profile one step of")
    ap.add_argument("--runs", default="", help="comma list of the runs the same / throughput parts "
                    "train, instead of their defaults (e.g. one_gpu,fsdp2,fsdp2_noreshard)")
    ap.add_argument("--flat", action="store_true",
                    help="leave only flat files at the top of --out (device output folders)")
    ap.add_argument("--archive", type=Path, help="also write the summaries and logs as one .tar.gz here "
                    "(at the end, also when a run fails or the call is interrupted with SIGINT or SIGTERM)")
    ap.add_argument("--out", default="outputs/two_gpu")
    ap.add_argument("extra", nargs="*", help="overrides added to every run")
    args = ap.parse_args()
    profiled = [name for name in args.profile.split(",") if name]
    for name in profiled:
        named_run(name)  # refuse a bad name before any run
    if profiled and args.steps < 5:
        ap.error("--profile needs --steps >= 5 (torchtitan's profiler warms up 3 steps)")
    if args.parts is None:
        args.parts = "" if profiled or args.runs else "same,throughput,faults,resume"
    parts = set(filter(None, args.parts.split(",")))
    if args.runs:
        check_runs(args.runs.split(","))  # before any run
    runner = Runner(args)
    runner.out.mkdir(parents=True, exist_ok=True)
    # `timeout` sends SIGTERM: end like SIGINT, so the summaries so far are flattened and packed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("two_gpu_checks: terminated (SIGTERM)"))
    try:
        run_parts(args, runner, parts, profiled)
    finally:
        if args.flat:  # also when a run fails: the summaries written so far stay
            flatten(runner.out)
        if args.archive:
            pack(runner.out, args.archive)


def run_parts(args, runner: Runner, parts: set[str], profiled: list[str]) -> None:
    runner.make_seed()
    report: dict = {"config": args.config, "steps": args.steps, "local_batch": args.local_batch,
                    "runs": []}
    save = lambda: (runner.out / "report.json").write_text(json.dumps(report, indent=1))  # noqa: E731
    all_steps = range(1, args.steps + 1)
    # load the seed (copied in as step-0) and save nothing: with checkpointing off it would not
    # be loaded, and each run would start from its own initialization
    from_seed = ["--checkpoint.enable", "--checkpoint.load_only"]

    def run(name: str) -> dict:
        ngpu, batches, extra = named_run(name)
        return runner.train(name, ngpu, from_seed + extra, batches=batches)

    names = args.runs.split(",") if args.runs else default_runs(parts)
    for tag in dict.fromkeys(map(optimizer_tag, names)):  # each optimizer, in the order first named
        mine = [n for n in names if optimizer_tag(n) == tag]
        one = run(f"one_gpu{tag}")
        rows = [one]
        # the 1-GPU run of the same per-GPU work (no accumulation), where asked for
        no_accum = run(f"one_gpu_no_accum{tag}") if f"one_gpu_no_accum{tag}" in mine else None
        rows += [no_accum] if no_accum else []
        report["runs"] += rows
        save()
        for name in (n for n in mine if named_run(n)[0] == 2):
            r = run(name)
            r["max_rel_loss_vs_1gpu"] = max_rel(r["losses"], one["losses"], all_steps)
            for key, ref in (("tps_per_gpu_vs_1gpu", one), ("tps_per_gpu_vs_1gpu_no_accum", no_accum)):
                if ref and r["tps_per_gpu"] and ref["tps_per_gpu"]:
                    r[key] = r["tps_per_gpu"] / ref["tps_per_gpu"]
            print(json.dumps({"name": name, **{k: r.get(k) for k in (
                "max_rel_loss_vs_1gpu", "tps_per_gpu_vs_1gpu", "tps_per_gpu_vs_1gpu_no_accum")}}),
                  flush=True)  # as soon as known: a call that runs out of time keeps them
            rows.append(r)
            report["runs"].append(r)
            save()  # after every run: a call that runs out of time keeps the report so far
        if not tag:
            plot([r for r in rows if r is not no_accum], runner.out / "same_losses.png")

    every = max(1, args.steps // 4)
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", str(every),
            "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "3",
            "--compile.no-enable"]
    ref = None
    if "faults" in parts:
        ref = runner.train("async_ref", 2, ckpt)
        dump = runner.prepare("async_killed")
        killed = runner.train("async_killed", 2, ckpt, dump=dump,
                              kill_at=dump / "checkpoint" / f"step-{2 * every}")
        again = runner.train("async_restart", 2, ckpt, dump=dump)
        again["max_rel_loss_vs_uninterrupted"] = max_rel(again["losses"], ref["losses"],
                                                         range(every + 1, args.steps + 1))
        report["runs"] += [ref, killed, again]
        save()
        shutil.rmtree(dump / "checkpoint", ignore_errors=True)  # disk: only the tb events stay

    if "resume" in parts:
        if ref is None:
            ref = runner.train("async_ref", 2, ckpt)
            report["runs"].append(ref)
        mid = runner.out / "async_ref" / "checkpoint" / f"step-{2 * every}"
        to_one = runner.train("resume_2to1", 1, ckpt, dump=runner.prepare("resume_2to1", mid))
        to_one["max_rel_loss_vs_writer"] = max_rel(to_one["losses"], ref["losses"],
                                                   range(2 * every + 1, args.steps + 1))
        one_ref = runner.train("one_gpu_ckpt", 1, ckpt)
        mid1 = runner.out / "one_gpu_ckpt" / "checkpoint" / f"step-{2 * every}"
        to_two = runner.train("resume_1to2", 2, ckpt, dump=runner.prepare("resume_1to2", mid1))
        to_two["max_rel_loss_vs_writer"] = max_rel(to_two["losses"], one_ref["losses"],
                                                   range(2 * every + 1, args.steps + 1))
        report["runs"] += [to_one, one_ref, to_two]
        save()

    for name in profiled:
        ngpu, batches, extra = named_run(name)
        dump = runner.out / f"{name}_profile"
        r = runner.train(dump.name, ngpu, from_seed + extra + profiler_overrides(args.steps), batches=batches)
        summary = summarize_ranks(dump / PROFILE_FOLDER)
        (runner.out / f"profile_{name}.md").write_text(format_ranks(
            f"{name}: one profiled step (step {args.steps - 1} of {args.steps}), {ngpu} GPU(s), "
            f"{r.get('tps_per_gpu') or 0:.0f} tokens/s per GPU, EP-rank load max/mean "
            f"{r.get('ep_rank_load_max_over_mean', 'n/a')}, alloc retries "
            f"{r.get('alloc_retries', 'n/a')}", summary))
        r["profile"] = {rank: {k: v for k, v in s.items() if "top" not in k}
                        for rank, s in summary.items()}
        report["runs"].append(r)
        save()

    save()
    print("\n| run | GPUs | starts at | tokens/s per GPU | x 1 GPU | x 1 GPU, no accumulation "
          "| peak GiB | max rel loss diff | EP-rank load max/mean | alloc retries |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        diff = next((r[k] for k in ("max_rel_loss_vs_1gpu", "max_rel_loss_vs_uninterrupted",
                                    "max_rel_loss_vs_writer") if r.get(k) is not None), None)
        tps = f"{r['tps_per_gpu']:.0f}" if r.get("tps_per_gpu") else "n/a"
        ratio, ratio_no_accum = (f"{r[k]:.2f}" if r.get(k) else ""
                                 for k in ("tps_per_gpu_vs_1gpu", "tps_per_gpu_vs_1gpu_no_accum"))
        print(f"| {r['name']} | {r['ngpu']} | {r.get('starts_at')} | {tps} | {ratio} | {ratio_no_accum} | "
              f"{r.get('peak_gib')} | {'' if diff is None else f'{diff:.2e}'} | "
              f"{r.get('ep_rank_load_max_over_mean', '')} | {r.get('alloc_retries', '')} |"
              + (f" killed: {r['killed']}" if "killed" in r else "")
              + (f" ERROR {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main()

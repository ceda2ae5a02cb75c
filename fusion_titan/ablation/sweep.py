"""An ablation sweep file (TOML or JSON): a base config, its variants, a FLOPs budget, seeds.

    [sweep]
    config = "train_configs/fusion_1b.toml"   # the base TOML (relative to the repository root)
    overrides = ["--training.seq_len", "2048"] # CLI overrides every run gets
    budget_tokens = 1_200_000                  # or budget_flops = 3.5e15 (exactly one of them)
    seeds = [0, 1]
    eval_points = 4                            # held-out evaluations besides step 1
    val_data = "outputs/data/heldout_docs"     # prepared directory whose val split is evaluated
    ngpu = 0                                   # 0 = run_train.sh's default
    timeout_s = 3600                           # per run
    jobs = 1                                   # runs trained at once (they share the machine)

    [variants.hybrid]
    overrides = []
    [variants.all_mla]
    overrides = ["--model.layer_schedule", "mha"]
    description = "every block MLA + MoE"

docs/ablations.md describes every key; JSON files hold the same tables.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SWEEP_KEYS = {"config", "overrides", "budget_tokens", "budget_flops", "seeds", "eval_points",
              "val_data", "ngpu", "timeout_s", "jobs"}
VARIANT_KEYS = {"overrides", "description"}
NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Keys the harness sets itself (budget, seeds, evaluation points, run folders); in a sweep they
# would silently break the equal-FLOPs rule or the shared held-out evaluation.
HARNESS_KEYS = ("--training.steps", "--job.dump_folder", "--debug.seed", "--data.seed",
                "--validation.enable", "--validation.freq", "--metrics.log_freq",
                "--metrics.enable_tensorboard", "--metrics.save_tb_folder")
# Shared by every run so that all are scored on the same batches: not in a variant.
EVAL_KEYS = ("--validation.", "--data.val_path")


class SweepError(ValueError):
    """A sweep file that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Sweep:
    path: Path
    config: str
    overrides: tuple[str, ...]
    variants: tuple[Variant, ...]
    budget_tokens: float | None = None
    budget_flops: float | None = None
    seeds: tuple[int, ...] = (0,)
    eval_points: int = 4
    val_data: str = ""
    ngpu: int = 0
    timeout_s: float = 3600.0
    jobs: int = 1
    text: str = field(default="", repr=False)  # the file as read, for the manifest


def _overrides(where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{where}: overrides must be a list of strings, CLI style, e.g. "
                         '["--model.layer_schedule", "mha"]')
    for token in value:
        key = token.split("=", 1)[0]
        if key in HARNESS_KEYS:
            raise SweepError(f"{where}: {key} is set by the harness (budget, seeds, evaluation); "
                             "remove it (the budget and seeds are [sweep] keys)")
    return tuple(value)


def _unknown(where: str, table: dict, allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise SweepError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def parse_sweep(data: dict, path: Path, text: str = "") -> Sweep:
    _unknown(str(path), data, {"sweep", "variants"})
    head = data.get("sweep")
    if not isinstance(head, dict) or "config" not in head:
        raise SweepError(f"{path}: needs a [sweep] table with config = the base TOML")
    _unknown(f"{path} [sweep]", head, SWEEP_KEYS)
    if ("budget_tokens" in head) == ("budget_flops" in head):
        raise SweepError(f"{path} [sweep]: set exactly one of budget_tokens (tokens the base "
                         "config trains on) or budget_flops (training FLOPs of every run)")
    budget = head.get("budget_tokens", head.get("budget_flops"))
    if not isinstance(budget, (int, float)) or budget <= 0:
        raise SweepError(f"{path} [sweep]: the budget must be a positive number, got {budget!r}")
    seeds = head.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SweepError(f"{path} [sweep]: seeds must be a non-empty list of distinct integers")
    eval_points = head.get("eval_points", 4)
    if not isinstance(eval_points, int) or eval_points < 1:
        raise SweepError(f"{path} [sweep]: eval_points must be an integer >= 1")
    jobs = head.get("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"{path} [sweep]: jobs (runs trained at once) must be an integer >= 1")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise SweepError(f"{path}: needs at least one [variants.NAME] table")
    parsed = []
    for name, table in variants.items():
        where = f"{path} [variants.{name}]"
        if not NAME.fullmatch(name):
            raise SweepError(f"{where}: a variant name may hold letters, digits, '_', '-', '.' only")
        if not isinstance(table, dict):
            raise SweepError(f"{where}: must be a table with overrides = [...]")
        _unknown(where, table, VARIANT_KEYS)
        overrides = _overrides(where, table.get("overrides", []))
        shared = [t for t in overrides if t.startswith(EVAL_KEYS)]
        if shared:
            raise SweepError(f"{where}: {shared[0]} would score this variant on other batches; "
                             "set evaluation keys in [sweep] overrides (and val_data) only")
        parsed.append(Variant(name, overrides, str(table.get("description", ""))))
    return Sweep(
        path=path, config=str(head["config"]), overrides=_overrides(f"{path} [sweep]", head.get("overrides", [])),
        variants=tuple(parsed), budget_tokens=head.get("budget_tokens"),
        budget_flops=head.get("budget_flops"), seeds=tuple(seeds), eval_points=eval_points,
        val_data=str(head.get("val_data", "")), ngpu=int(head.get("ngpu", 0)),
        timeout_s=float(head.get("timeout_s", 3600)), jobs=jobs, text=text)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no sweep file {path} (see docs/ablations.md for the format)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise SweepError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    return parse_sweep(data, path, text)

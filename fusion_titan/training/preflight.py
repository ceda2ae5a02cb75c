"""A run's configuration checked in its first seconds, before torchtitan builds anything.

fusion_titan.train calls `preflight` right after torchtitan has parsed the TOML and the CLI. A
wrong flavor or model override, a parallel plan that cannot shard, a `[validation] seq_len`
beyond the model's rope table, or a checkpoint folder that is already at `training.steps` stops
the run with one `ConfigError` message (the entry point prints it and exits with code 2) instead
of a traceback after the model is built -- or, for the last one, a run that trains nothing and
reports success. On success it returns the one line that says where the run starts.
"""

from __future__ import annotations

import os

from ..checkpoint.manager import resume_step
from ..infra.plan_check import check_parallel_plan


class ConfigError(ValueError):
    """A run that cannot start as configured; the message names the setting to change."""


def model_args(job_config):
    """The model arguments exactly as the trainer will build them (flavor + overrides), checked."""
    from ..model.flavors import FLAVORS

    try:
        args = FLAVORS[job_config.model.flavor]
        args.update_from_config(job_config)  # validates the overrides
    except (KeyError, ValueError) as error:
        raise ConfigError(error.args[0] if error.args else str(error)) from None
    return args


def check_validation(job_config, max_seq_len: int) -> None:
    val = job_config.validation
    if val.enable and val.seq_len > max_seq_len:
        raise ConfigError(
            f"[validation] seq_len = {val.seq_len} is longer than the model's rope table "
            f"(max_seq_len {max_seq_len}: the flavor's, or [training] seq_len if larger); set "
            f"--validation.seq_len {max_seq_len} or less"
        )


def check_cudagraphs(job_config, world: int) -> None:
    """CUDA graph trees replay a graph over the memory of its previous outputs. With gradient
    accumulation the first micro-batch's parameter gradients are outputs of the backward graph
    that autograd keeps as .grad: the next micro-batch's replay would overwrite them."""
    training = job_config.training
    if not getattr(job_config.compile, "cudagraphs", False) or training.global_batch_size <= 0:
        return
    accumulation = training.global_batch_size // (training.local_batch_size * world)
    if accumulation > 1:
        raise ConfigError(
            f"[compile] cudagraphs = true cannot run with gradient accumulation ({accumulation} "
            f"micro-batches per step: global_batch_size {training.global_batch_size}, "
            f"local_batch_size {training.local_batch_size}, {world} rank(s)): the CUDA graphs "
            "would overwrite the gradients of the earlier micro-batches. Set cudagraphs = false, "
            "or global_batch_size = local_batch_size x ranks.")


def start_line(job_config) -> str:
    """Where the run starts (fresh, from initial weights, or resuming); ConfigError if it is done."""
    ckpt, steps = job_config.checkpoint, job_config.training.steps
    dump = job_config.job.dump_folder
    if not ckpt.enable:
        return f"Starting a new run in {dump} (checkpointing off: nothing is resumed or saved)."
    folder = os.path.join(dump, ckpt.folder)
    if not os.path.exists(folder):
        if ckpt.initial_load_path:
            return (f"Starting a new run in {dump} from the weights in {ckpt.initial_load_path}"
                    f"{' (model only)' if ckpt.initial_load_model_only else ''}.")
        return f"Starting a new run in {dump} (checkpoints go to {folder})."
    if ckpt.load_step != -1:
        step = ckpt.load_step
    else:
        try:
            step = resume_step(folder, warn=False)  # the step FusionCheckpointManager will load
        except RuntimeError as error:  # only exports, or a corrupt newest folder: says what to do
            raise ConfigError(str(error)) from None
    if step == -1:
        return f"Starting a new run in {dump} ({folder} holds no checkpoint yet)."
    path = os.path.join(folder, f"step-{step}")
    if step >= steps:
        raise ConfigError(
            f"Nothing to train: {path} is at step {step} and training.steps is {steps}. To train "
            f"further, raise it (e.g. --training.steps {2 * max(step, 1)}); to start a fresh run, "
            f"give a new --job.dump_folder (e.g. --job.dump_folder {dump.rstrip('/')}_2) or "
            "--checkpoint.no-enable (no checkpoint is loaded or saved)."
        )
    if step == 0:
        return f"Starting from the seed checkpoint {path} (model weights only)."
    return f"Resuming from checkpoint {path}: step {step} done, training steps {step + 1}-{steps}."


def preflight(job_config) -> str:
    """Every check above for a `fusion` model; returns the start line. Raises ConfigError."""
    from ..spec import SPEC_NAME

    if job_config.model.name == SPEC_NAME:
        args = model_args(job_config)
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("NGPU", "1")))
        if job_config.comm.mode in ("fake_backend", "local_tensor"):
            world = int(os.environ.get("NGPU", "1"))  # one process plays rank 0 of NGPU ranks
        try:
            check_parallel_plan(job_config.parallelism, world, args.n_routed_experts)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        check_validation(job_config, args.max_seq_len)
        check_cudagraphs(job_config, world)
    return start_line(job_config)

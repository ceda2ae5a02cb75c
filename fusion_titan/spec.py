"""Registers the "fusion" TrainSpec with torchtitan (`[experimental] custom_import = "fusion_titan.spec"`)."""

from __future__ import annotations

from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from .checkpoint.state_dict_adapter import FusionStateDictAdapter
from .data.dataloader import build_dataloader
from .data.tokenizer import build_tokenizer
from .infra.parallelize import parallelize_fusion
from .model.flavors import FLAVORS
from .model.model import FusionModel
from .training.loss import build_loss_fn
from .training.lr_schedule import build_lr_schedulers
from .training.metrics import build_metrics_processor
from .training.optimizer import build_optimizers
from .training.validate import build_validator

SPEC_NAME = "fusion"


def fusion_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=FusionModel,
        model_args=FLAVORS,
        parallelize_fn=parallelize_fusion,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_loss_fn,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
        state_dict_adapter=FusionStateDictAdapter,  # HF names + config.json (docs/checkpointing.md)
    )


def register() -> None:
    try:
        get_train_spec(SPEC_NAME)
    except ValueError:
        register_train_spec(SPEC_NAME, fusion_train_spec())


register()

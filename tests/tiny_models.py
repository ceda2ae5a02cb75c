"""A tiny float64 model of the debug flavor's shapes for the decoding / generation tests."""

import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel


def tiny_model(seed: int = 0, **overrides) -> FusionModel:
    args = FLAVORS["debugmodel"].replace(vocab_size=256, n_layers=6, max_seq_len=64, **overrides)
    torch.manual_seed(seed)
    model = FusionModel(args)
    model.init_weights()
    return model.double().eval()

"""Token mixers, one module per kind; importing this package registers every kind (registry.py)."""

from . import attn, block_sparse, csa, gdn, linear, mamba2, mla  # noqa: F401  (registration side effects)
from .registry import FAMILIES, MIXERS, MixerKind, mixer_kind, register_mixer

__all__ = ["FAMILIES", "MIXERS", "MixerKind", "mixer_kind", "register_mixer"]

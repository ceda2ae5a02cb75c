"""Optimizers: NorMuon for matrices (incl. MoE experts), CautiousAdamW for the rest."""

from .cautious_adamw import CautiousAdamW
from .newton_schulz import zeropower_via_newtonschulz5
from .normuon import NorMuon

__all__ = ["CautiousAdamW", "NorMuon", "zeropower_via_newtonschulz5"]

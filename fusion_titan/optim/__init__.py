"""Optimizers: Muon / NorMuon for matrices (incl. MoE experts), CautiousAdamW / AdamW for the rest."""

from .cautious_adamw import CautiousAdamW
from .muon import Muon
from .newton_schulz import zeropower_via_newtonschulz5
from .normuon import NorMuon

__all__ = ["CautiousAdamW", "Muon", "NorMuon", "zeropower_via_newtonschulz5"]

"""One optimizer holding both rules: NorMuon for matrix weights, CautiousAdamW for the rest.

torchtitan's OptimizersContainer (checkpointing, LR scheduling, hooks) expects one optimizer per
model part. Instead of joining two optimizers' DCP state, this class *is* one optimizer: its
param groups are the two inner optimizers' groups (the very same dicts), and the inner
optimizers share its `state`. So `state_dict()`, DCP resharding and LambdaLR all see ordinary
param groups, each with its own lr, while `step()` runs each rule on its own groups.
"""

from __future__ import annotations

import torch

from .cautious_adamw import CautiousAdamW
from .normuon import NorMuon


class NorMuonCautiousAdamW(torch.optim.Optimizer):
    def __init__(self, muon_groups: list[dict], adam_groups: list[dict],
                 muon_kwargs: dict, adam_kwargs: dict):
        self.normuon = NorMuon(muon_groups, **muon_kwargs) if muon_groups else None
        self.adamw = CautiousAdamW(adam_groups, **adam_kwargs) if adam_groups else None
        groups = []
        for opt, rule in self._rules():
            for g in opt.param_groups:
                g["rule"] = rule
                groups.append(g)
        super().__init__(groups, defaults={})
        self._link_rules()

    def _rules(self):
        return [(opt, rule) for opt, rule in ((self.normuon, "normuon"), (self.adamw, "adamw"))
                if opt is not None]

    def _link_rules(self) -> None:
        """Point each rule at our groups and our one state table (what DCP saves is what they use)."""
        for opt, rule in self._rules():
            opt.state = self.state
            opt.param_groups = [g for g in self.param_groups if g["rule"] == rule]

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._link_rules()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt, _ in self._rules():
            opt.step()
        return loss

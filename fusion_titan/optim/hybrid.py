"""One optimizer holding several rules, e.g. NorMuon / Muon for matrix weights and an Adam for the rest.

torchtitan's OptimizersContainer (checkpointing, LR scheduling, hooks) expects one optimizer per
model part. Instead of joining several optimizers' DCP state, this class *is* one optimizer: its
param groups are the inner optimizers' groups (the very same dicts, each tagged with its rule's
name under "rule"), and the inner optimizers share its `state`. So `state_dict()`, DCP
resharding and LambdaLR all see ordinary param groups, each with its own lr, while `step()` runs
each rule on its own groups.
"""

from __future__ import annotations

import torch


class HybridOptimizer(torch.optim.Optimizer):
    """`rules`: {rule name: optimizer}; a None optimizer (a rule with no parameters) is left out."""

    def __init__(self, rules: dict[str, torch.optim.Optimizer | None]):
        self.rules = {rule: opt for rule, opt in rules.items() if opt is not None}
        groups = []
        for rule, opt in self.rules.items():
            for g in opt.param_groups:
                g["rule"] = rule
                groups.append(g)
        super().__init__(groups, defaults={})
        self._link_rules()

    def _link_rules(self) -> None:
        """Point each rule at our groups and our one state table (what DCP saves is what they use)."""
        for rule, opt in self.rules.items():
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
        for opt in self.rules.values():
            opt.step()
        return loss

"""Expert parallel under torchtitan's fake communication backend (`[comm] mode = "fake_backend"`).

With the fake backend one process plays rank 0 of a large plan and collectives move nothing:
their outputs are uninitialized memory. torchtitan's ExpertParallel first exchanges the token
counts per expert with an all-to-all and turns them into split sizes on the host, so under the
fake backend the split sizes are garbage ("Storage size calculation overflowed").

For measuring memory and compute of an expert-parallel plan on one GPU, this variant assumes a
mirrored exchange instead: from each EP rank r this rank receives as many tokens, per local
expert, as it sends to rank r's experts. So it receives exactly as many tokens as it sends (what
a balanced router gives on average), whatever the fake-initialized router does. Only the count exchange changes; the token all-to-all (fake: no data moved),
the permutation, the grouped GEMMs and the combine run as in torchtitan. Never used with a real
backend (parallelize.py picks it only in fake mode).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from torchtitan.distributed.expert_parallel import ExpertParallel
from torchtitan.models.moe.utils import _permute

from .torchtitan_version import require_supported_torchtitan


class BalancedFakeExpertParallel(ExpertParallel):
    def __init__(self):
        require_supported_torchtitan()  # overrides ExpertParallel._token_dispatch of 0.2.2
        super().__init__()

    def _token_dispatch(self, mod, inputs: tuple, device_mesh) -> tuple[Tensor, Tensor]:
        routed_input, num_tokens_per_expert = inputs
        ep_degree = device_mesh.shape[0]
        num_local_experts = num_tokens_per_expert.shape[0] // ep_degree
        with torch.no_grad():
            # [local expert e from EP rank r] = what we send to rank r's expert e
            received = num_tokens_per_expert.clone()
            self.input_splits = num_tokens_per_expert.view(ep_degree, -1).sum(dim=1).tolist()
            self.output_splits = list(self.input_splits)
        routed_input = _finite(all_to_all_single_autograd(
            routed_input, self.output_splits, self.input_splits, device_mesh.get_group()))
        self.input_shape, routed_input, self.permuted_indices, received = _permute(
            routed_input, received, ep_degree, num_local_experts)
        return routed_input, received

    def _token_combine(self, mod, routed_output: Tensor, device_mesh) -> Tensor:
        return _finite(super()._token_combine(mod, routed_output, device_mesh))


def _finite(t: Tensor) -> Tensor:
    """Fake receive buffers are uninitialized memory and can hold NaN/Inf bit patterns."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

"""Run torchtitan's unmodified Trainer on a machine without an accelerator.

torchtitan 0.2.2 assumes a GPU (its issue 1661). Four things stand in the way on CPU:

1. `torchtitan.tools.utils` picks device type "cuda" when no accelerator is found, and many
   torchtitan modules copy `device_type` / `device_module` at import time.
2. gloo has no PREMUL_SUM, which FSDP2 uses for its gradient reduce-scatter once torchtitan sets
   the gradient divide factor to 1 (it normalizes by the global token count itself).
3. `torch.histc` has no integer CPU kernel (MoE token counts): our router uses `bincount`, so only
   torchtitan's own MoE would hit it; we leave torch alone.
4. Expert parallel permutes tokens with a Triton kernel; torchtitan ships a CPU variant behind a
   flag that its caller never sets.

`install()` fixes 1 and 4 by patching torchtitan's module attributes (every copy of
`device_type` / `device_module`), best before the trainer modules are imported; 2 is handled
where FSDP is applied (`force_sum_reduction_for_cpu`). Nothing in torch or torchtitan is edited on disk.
These are 0.2.2's internals: `install()` first stops on any other torchtitan (torchtitan_version.py).
"""

from __future__ import annotations

import os
import resource
import sys
import types

import torch

from .torchtitan_version import require_supported_torchtitan

_installed = False


def accelerator_available() -> bool:
    if os.environ.get("FUSION_FORCE_CPU", "0") == "1":
        return False
    return torch.cuda.is_available()


def _cpu_device_module() -> types.SimpleNamespace:
    """The subset of `torch.cuda`'s API that torchtitan calls, answered for the host CPU."""

    def memory_stats(device=None) -> dict:
        # Peak resident set size of this process: the closest CPU analogue of peak reserved.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name="cpu")

    return types.SimpleNamespace(
        set_device=lambda device: None,
        current_device=lambda: 0,
        device_count=lambda: 1,
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        reset_peak_memory_stats=lambda device=None: None,
        memory_stats=memory_stats,
        get_device_name=lambda device=None: "cpu",
        get_device_properties=get_device_properties,
        is_available=lambda: True,
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
    )


def install() -> bool:
    """Point torchtitan at the CPU when no accelerator exists. Returns True if it did."""
    global _installed
    if _installed:
        return True
    if accelerator_available():
        return False
    require_supported_torchtitan()  # the attributes patched below are 0.2.2's
    import torchtitan.tools.utils as tt_utils

    # torchtitan modules copy these two names at import time (`from ...utils import device_type`):
    # replace every copy already made; modules imported later copy the patched values.
    cpu_module = _cpu_device_module()
    old_type, old_module = tt_utils.device_type, tt_utils.device_module
    for name, module in list(sys.modules.items()):
        if name.startswith("torchtitan") and module is not None:
            if getattr(module, "device_type", None) is old_type:
                module.device_type = "cpu"
            if getattr(module, "device_module", None) is old_module:
                module.device_module = cpu_module

    import torchtitan.models.moe.kernels as moe_kernels
    import torchtitan.models.moe.utils as moe_utils

    def generate_permute_indices(*args, **kwargs):
        kwargs["use_cpu"] = True  # the Triton kernel cannot run on CPU tensors
        return moe_kernels.generate_permute_indices(*args, **kwargs)

    moe_utils.generate_permute_indices = generate_permute_indices
    _installed = True
    return True


def force_sum_reduction_for_cpu(model: torch.nn.Module) -> None:
    """gloo lacks PREMUL_SUM: make FSDP2 reduce with SUM and scale separately (same result)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)

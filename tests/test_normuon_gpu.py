"""NorMuon on CUDA (bf16 Newton-Schulz, fused in-place apply) against the same step on CPU in
float32: the fast path changes rounding only."""

import pytest
import torch

from fusion_titan.optim import NorMuon


@pytest.mark.gpu
@pytest.mark.parametrize("update_scale", ["muon", "adamw"])
def test_normuon_cuda_bf16_matches_cpu_fp32(update_scale):
    torch.manual_seed(0)
    shapes = [(256, 384), (384, 256), (8, 128, 192)]
    weights = [torch.randn(s) * 0.02 for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
        opt = NorMuon(params, lr=0.02, weight_decay=0.1, update_scale=update_scale)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(device)
            opt.step()
        results[device] = [p.detach().cpu() for p in params]
    for w0, cpu, cuda in zip(weights, results["cpu"], results["cuda"]):
        moved = (cpu - w0).norm()
        assert moved > 0
        # bf16 iterations: the update differs by bf16 rounding (~1%), far less than its size
        assert (cuda - cpu).norm() < 0.05 * moved

"""Our Newton-Schulz iteration against the independent float64 reference, step by step."""

import pytest
import torch

from fusion_titan.optim import zeropower_via_newtonschulz5
from newton_schulz_reference import reference_newton_schulz

SHAPES = {"square": (48, 48), "wide": (32, 64), "tall": (64, 32),
          "batched_wide": (4, 16, 24), "batched_tall": (3, 40, 8)}
# Relative to the largest entry. Our iteration normalises in float32 whatever the ns dtype, so a
# float64 ns dtype agrees to about float32 rounding too; a wrong coefficient in the 4th digit, a
# missing transpose or one step more or less is off by 1e-4 or far more.
RELATIVE_TOL = {torch.float32: 1e-5, torch.float64: 2e-6}


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_iterates_match_the_reference(shape, ns_dtype):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    previous = reference_newton_schulz(G, steps=0)
    for steps in range(1, 6):
        expected = reference_newton_schulz(G, steps)
        got = zeropower_via_newtonschulz5(G, steps=steps, dtype=ns_dtype)
        assert got.shape == G.shape and got.dtype == G.dtype
        tol = RELATIVE_TOL[ns_dtype] * expected.abs().max()
        error = (got.double() - expected).abs().max()
        assert error <= tol, f"step {steps}: max error {error:.2e} > {tol:.2e}"
        # the tolerance separates consecutive iterates by orders of magnitude
        assert (expected - previous).abs().max() > 100 * tol
        previous = expected


def test_float64_input_keeps_its_dtype():
    torch.manual_seed(1)
    G = torch.randn(2, 12, 20, dtype=torch.float64)
    got = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float64)
    assert got.dtype == torch.float64
    expected = reference_newton_schulz(G, steps=5)
    assert (got - expected).abs().max() <= RELATIVE_TOL[torch.float64] * expected.abs().max()

"""`[model] residual`: "scaled" starts as "plain" and computes (1 + a) * x + (1 + b) * f(x)."""

import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.model import FusionModel


def build(residual, seed=0):
    args = FLAVORS["debugmodel"].replace(vocab_size=256, residual=residual).replace()
    torch.manual_seed(seed)
    model = FusionModel(args).double()
    model.init_weights()
    return model


def test_scaled_starts_as_plain():
    plain, scaled = build("plain"), build("scaled")
    tokens = torch.randint(0, 256, (2, 12))
    assert torch.equal(plain(tokens), scaled(tokens))
    names = {n for n, _ in scaled.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names and all(n.endswith(("residual_scale", "sublayer_scale")) for n in names)


def test_scaled_block_matches_its_formula_and_learns_the_scales():
    model = build("scaled")
    block = model.layers["5"]  # the Gated DeltaNet block: no routing, so the formula is direct
    with torch.no_grad():
        for p in (block.mixer_residual.residual_scale, block.mixer_residual.sublayer_scale,
                  block.ffn_residual.residual_scale, block.ffn_residual.sublayer_scale):
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 10, block.attention_norm.normalized_shape[0], dtype=torch.float64)
    r1, r2 = block.mixer_residual, block.ffn_residual
    h = (1 + r1.residual_scale) * x + (1 + r1.sublayer_scale) * block.mixer(block.attention_norm(x))
    want = (1 + r2.residual_scale) * h + (1 + r2.sublayer_scale) * block.feed_forward(block.ffn_norm(h))
    got = block(x, model.rope)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert r1.residual_scale.grad.abs().sum() > 0 and r2.sublayer_scale.grad.abs().sum() > 0

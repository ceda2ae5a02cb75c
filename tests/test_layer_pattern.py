"""`[model] layer_pattern`: the notation, the schedule presets through it, and its errors."""

import pytest
import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.layer_pattern import LayerSpec, parse_layer_pattern, resolve_layers
from fusion_titan.model.model import FusionModel


def kinds(pattern):
    return [s.mixer for s in parse_layer_pattern(pattern)]


def test_notation():
    assert kinds("(gdn,gdn,csa,attn)*4") == ["gdn", "gdn", "csa", "attn"] * 4
    assert kinds("mla*5,gdn") == ["mla"] * 5 + ["gdn"]
    assert kinds(" mla , (gdn*2, mla)*2 ") == ["mla", "gdn", "gdn", "mla", "gdn", "gdn", "mla"]
    assert parse_layer_pattern("mla+moe,gdn + dense,mla") == [
        LayerSpec("mla", "moe"), LayerSpec("gdn", "dense"), LayerSpec("mla", None)]
    assert kinds("((mla,gdn)*2,mamba2)*2") == (["mla", "gdn"] * 2 + ["mamba2"]) * 2


@pytest.mark.parametrize("bad, message", [
    ("(mla,gdn", "not closed"), ("mla*0", ">= 1"), ("mla,,gdn", "unexpected ','"),
    ("mla gdn", "unexpected 'gdn'"), ("mla;gdn", "cannot read"), ("", "ends where"),
])
def test_syntax_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_pattern(bad)


def test_schedules_are_patterns():
    # today's presets, their period repeated and cut to n_layers
    assert [s.mixer for s in resolve_layers("", "5:1", 8)] == ["mla"] * 5 + ["gdn"] + ["mla"] * 2
    assert [s.mixer for s in resolve_layers("", "2:2", 5, "mamba2")] == ["mla"] * 2 + ["mamba2"] * 2 + ["mla"]
    assert [s.mixer for s in resolve_layers("", "ssm", 3)] == ["gdn"] * 3
    with pytest.raises(ValueError, match="layer_schedule"):
        resolve_layers("", "five-to-one", 6)
    # an explicit pattern wins over the schedule
    assert [s.mixer for s in resolve_layers("gdn*3", "5:1", 3)] == ["gdn"] * 3


def test_model_errors_name_the_item_and_the_valid_names():
    args = FLAVORS["debugmodel"].replace(vocab_size=256)
    with pytest.raises(ValueError, match=r"unknown mixer 'foo' at layer 5 .*valid mixers: \[.*'gdn'.*'mla'"):
        args.replace(layer_pattern="mla*5,foo").validate()
    with pytest.raises(ValueError, match=r"unknown FFN 'moo' at layer 0 .*valid FFNs: \['dense', 'moe'\]"):
        args.replace(layer_pattern="mla+moo,mla*5").validate()
    with pytest.raises(ValueError, match="has 5 blocks but n_layers = 6"):
        args.replace(layer_pattern="mla*5").validate()
    with pytest.raises(ValueError, match="needs n_routed_experts > 0"):
        args.replace(layer_pattern="mla+moe*6", n_routed_experts=0).validate()


def test_pattern_builds_the_blocks_it_names():
    args = FLAVORS["debugmodel"].replace(vocab_size=256, layer_pattern="mla,gdn+moe,mla+dense,gdn,mamba2,mla",
                                         mamba_d_state=16, mamba_head_dim=32)
    model = FusionModel(args)
    model.init_weights()
    blocks = list(model.layers.values())
    assert [b.kind for b in blocks] == ["mla", "gdn", "mla", "gdn", "mamba2", "mla"]
    # explicit FFNs, else the family default (attention -> MoE with experts; recurrent -> dense)
    assert [b.moe_enabled for b in blocks] == [True, True, False, False, False, True]
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens, labels=tokens)
    out["ce_sum"].backward()
    for b in blocks:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.mixer.parameters())

"""`[model] layer_pattern`: the trunk's block kinds, one per layer, in a small notation.

    pattern := item ("," item)*
    item    := ( "(" pattern ")" | mixer ["+" ffn] ) ["*" count]

`"(gdn,gdn,csa,attn)*4"` is 16 layers; `"mla*5,gdn"` is one period of the "5:1" schedule;
`"mla+moe,gdn+dense"` names each block's feed-forward explicitly. Mixer names come from the
mixer registry (fusion_titan/model/mixers), FFN names from fusion_titan/model/ffn.py. A block
without "+ffn" gets its family's default (model/blocks.py: attention-type mixers the MoE FFN
when the model has routed experts, recurrent ones a dense SwiGLU).

The `layer_schedule` presets ("5:1", "mha", "ssm", any "A:B") are patterns too: their period is
repeated to fill n_layers, the last period cut short.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEDULE_PRESETS = ("5:1", "6:1", "8:1", "mha", "ssm")


@dataclass(frozen=True)
class LayerSpec:
    mixer: str
    ffn: str | None = None  # None = the mixer family's default


_TOKEN = re.compile(r"\s*(\(|\)|,|\*\s*\d+|[A-Za-z_][A-Za-z0-9_]*(?:\s*\+\s*[A-Za-z_][A-Za-z0-9_]*)?)")


def _tokens(pattern: str) -> list[str]:
    tokens, pos = [], 0
    text = pattern.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"layer_pattern {pattern!r}: cannot read {text[pos:].strip()!r} "
                             "(write e.g. \"(gdn,gdn,csa,attn)*4\" or \"mla*5,gdn\")")
        tokens.append(re.sub(r"\s+", "", m.group(1)))
        pos = m.end()
    return tokens


def parse_layer_pattern(pattern: str) -> list[LayerSpec]:
    """The pattern's blocks in order (names are not checked here: see check_layer_specs)."""
    tokens = _tokens(pattern)
    pos = 0

    def sequence() -> list[LayerSpec]:
        nonlocal pos
        out = item()
        while pos < len(tokens) and tokens[pos] == ",":
            pos += 1
            out += item()
        return out

    def item() -> list[LayerSpec]:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"layer_pattern {pattern!r} ends where a block kind was expected")
        tok = tokens[pos]
        if tok == "(":
            pos += 1
            inner = sequence()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError(f"layer_pattern {pattern!r}: a '(' is not closed")
            pos += 1
        elif tok[0].isalpha() or tok[0] == "_":
            mixer, _, ffn = tok.partition("+")
            inner = [LayerSpec(mixer, ffn or None)]
            pos += 1
        else:
            raise ValueError(f"layer_pattern {pattern!r}: unexpected {tok!r} where a block kind "
                             "or '(' was expected")
        if pos < len(tokens) and tokens[pos].startswith("*"):
            count = int(tokens[pos][1:])
            if count < 1:
                raise ValueError(f"layer_pattern {pattern!r}: repeat counts must be >= 1")
            inner = inner * count
            pos += 1
        return inner

    specs = sequence()
    if pos != len(tokens):
        raise ValueError(f"layer_pattern {pattern!r}: unexpected {tokens[pos]!r}")
    return specs


def schedule_pattern(schedule: str, recurrent_kind: str = "gdn") -> str:
    """One period of a `layer_schedule` preset as a layer pattern ("5:1" -> "mla*5,gdn")."""
    if schedule == "mha":
        return "mla"
    if schedule == "ssm":
        return recurrent_kind
    try:
        n_attn, n_rec = (int(x) for x in schedule.split(":"))
        assert n_attn >= 0 and n_rec >= 0 and n_attn + n_rec > 0
    except (ValueError, AssertionError):
        raise ValueError(
            f"layer_schedule {schedule!r} is not understood: use one of {SCHEDULE_PRESETS} or any "
            "'A:B' with A MLA blocks then B recurrent blocks, repeated; or set [model] layer_pattern."
        ) from None
    parts = [f"mla*{n_attn}"] * (n_attn > 0) + [f"{recurrent_kind}*{n_rec}"] * (n_rec > 0)
    return ",".join(parts)


def resolve_layers(layer_pattern: str, layer_schedule: str, n_layers: int,
                   recurrent_kind: str = "gdn") -> list[LayerSpec]:
    """The model's blocks: the explicit pattern (its length must be n_layers), else the
    schedule's period repeated to n_layers."""
    if layer_pattern:
        specs = parse_layer_pattern(layer_pattern)
        if len(specs) != n_layers:
            raise ValueError(
                f"layer_pattern {layer_pattern!r} has {len(specs)} blocks but n_layers = {n_layers}; "
                "make them equal (e.g. adjust a repeat count or --model.n_layers)")
        return specs
    period = parse_layer_pattern(schedule_pattern(layer_schedule, recurrent_kind))
    return [period[i % len(period)] for i in range(n_layers)]

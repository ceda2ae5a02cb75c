"""Causal depthwise convolution over time + SiLU: the short conv of Gated DeltaNet and Mamba-2."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConv(nn.Module):
    """weight [channels, conv_size] (+ optional bias [channels]); weight[:, -1] multiplies the current
    token, weight[:, 0] the oldest (nn.Conv1d's orientation with left padding conv_size - 1).

    forward(x [B, T, C], state [B, conv_size - 1, C] | None) -> (silu(conv(x)), new state): the
    state is the last conv_size - 1 inputs, so decoding continues exactly where a prefill stopped.
    """

    def __init__(self, channels: int, conv_size: int, bias: bool = False):
        super().__init__()
        self.channels = channels
        self.conv_size = conv_size
        self.weight = nn.Parameter(torch.empty(channels, conv_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None):
        width = self.conv_size
        if document_ids is not None:
            if state is not None:
                raise NotImplementedError("document_ids are for training, not for decoding with a state")
            return self._within_documents(x, document_ids), None
        if state is None:
            xp = F.pad(x, (0, 0, width - 1, 0))  # left-pad time with zeros: causal
        else:
            xp = torch.cat([state.to(x.dtype), x], dim=1)
        y = F.conv1d(xp.transpose(1, 2), self.weight.unsqueeze(1), self.bias, groups=self.channels)
        new_state = xp[:, xp.shape[1] - (width - 1):].clone()  # do not pin the whole prefill buffer
        return F.silu(y.transpose(1, 2)), new_state

    def _within_documents(self, x: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
        """The same convolution, but a token never sees the inputs of an earlier document
        (packed sequences): tap s reads x[t - s] only where document_ids[t - s] == document_ids[t]."""
        width, T = self.conv_size, x.shape[1]
        xp = F.pad(x, (0, 0, width - 1, 0))
        docs = F.pad(document_ids, (width - 1, 0), value=-1)  # left padding: no document
        y = torch.zeros_like(x) if self.bias is None else self.bias.to(x.dtype).expand_as(x).clone()
        for s in range(width):  # s = how many tokens back; weight[:, -1] is the current token
            start = width - 1 - s
            same = (docs[:, start : start + T] == document_ids).unsqueeze(-1).to(x.dtype)
            y = y + xp[:, start : start + T] * same * self.weight[:, width - 1 - s].to(x.dtype)
        return F.silu(y)

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: fan_in = conv_size for a depthwise conv, for weight and bias.
        bound = 1.0 / math.sqrt(self.conv_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

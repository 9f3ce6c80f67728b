"""3x3 convolutions whose weight gradient runs on AMX tiles (`fastcifar.ops.amx_conv`):
bf16 channels-last training on a CPU with AMX, where oneDNN's backward-weights ran at a
third to a half of its forward rate and a third of CerberusNet's step
(benchmarks/NOTES.md)."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.models.conv3x3 import bf16_cpu_batch, plain_conv3x3, swap_convs
from fastcifar.ops.amx_conv import CHANNEL_MULTIPLE, amx_conv3x3


def takes(conv: nn.Module) -> bool:
    """Whether `conv` is one `AmxGradConv2d` computes (`plain_conv3x3`, channels in
    multiples of 32)."""
    return plain_conv3x3(conv, CHANNEL_MULTIPLE)


class AmxGradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3x3, padding 1) whose weight and bias gradients come from the AMX
    kernel, for CPU bf16 channels-last batches in training; anything else goes to
    `F.conv2d`. Parameters and state dict are `nn.Conv2d`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and bf16_cpu_batch(x)):
            return super().forward(x)
        return amx_conv3x3(x.to(torch.bfloat16), self.weight, self.bias)


def use_amx_conv(model: nn.Module) -> int:
    """Replace every convolution of `model` that `takes` by an `AmxGradConv2d` holding the
    same parameters, in place; returns how many."""
    return swap_convs(model, takes, AmxGradConv2d)


def amx_conv_available() -> bool:
    """A CPU with AMX whose tiles this process may use, and `fastcifar._C` loaded."""
    from fastcifar.ops import native

    return native.amx_tiles_usable()

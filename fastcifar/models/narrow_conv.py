"""3x3 convolutions with few input channels (a network's first layer, RGB in) whose
weight gradient comes from fastcifar's AVX2 kernel (`fastcifar.ops.narrow_conv`): fp32
channels-last CPU training, where oneDNN's backward-weights for such a layer ran at about
a fifth of the fp32 matmul rate (benchmarks/NOTES.md)."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.models.conv3x3 import fp32_cpu_batch, plain_conv3x3, swap_convs
from fastcifar.ops.narrow_conv import OUTPUT_MULTIPLE, narrow_conv3x3

MAX_INPUT_CHANNELS = 4  # "few": RGB, or RGB and one more


def takes(conv: nn.Module) -> bool:
    """Whether `conv` is one `NarrowGradConv2d` computes: `plain_conv3x3`, at most 4 input
    channels, output channels in multiples of 8."""
    return (
        plain_conv3x3(conv, 1)
        and conv.in_channels <= MAX_INPUT_CHANNELS
        and conv.out_channels % OUTPUT_MULTIPLE == 0
    )


class NarrowGradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3x3, padding 1, few input channels) whose weight and bias gradients
    come from the AVX2 kernel, for CPU fp32 channels-last batches in training; anything
    else goes to `F.conv2d`. Parameters and state dict are `nn.Conv2d`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad and fp32_cpu_batch(x)):
            return super().forward(x)
        return narrow_conv3x3(x, self.weight, self.bias)


def use_narrow_conv(model: nn.Module) -> int:
    """Replace every convolution of `model` that `takes` by a `NarrowGradConv2d` holding
    the same parameters, in place; returns how many."""
    return swap_convs(model, takes, NarrowGradConv2d)


def narrow_conv_available() -> bool:
    """A CPU with AVX2 or AVX-512 (as ATen detects them) and `fastcifar._C` loaded."""
    from fastcifar.ops import native

    return native.avx2_kernels_loaded()

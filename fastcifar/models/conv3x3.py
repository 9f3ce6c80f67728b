"""What the 3x3 convolution layers with native kernels share (`models.winograd`,
`models.amx_conv`): which convolutions they take, whether a batch reaches them in bf16
or fp32, and swapping them into a model with the same parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def plain_conv3x3(conv: nn.Module, channel_multiple: int) -> bool:
    """Whether `conv` is a plain `nn.Conv2d`, 3x3, stride 1, padding 1 (zeros), no
    dilation or groups, its channels in multiples of `channel_multiple`."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels % channel_multiple == 0
        and conv.out_channels % channel_multiple == 0
    )


def fp32_cpu_batch(x: torch.Tensor) -> bool:
    """Whether `x` is a 4-D channels-last fp32 CPU batch that reaches a convolution in
    fp32 (no CPU autocast)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
    )


def bf16_cpu_batch(x: torch.Tensor) -> bool:
    """Whether `x` is a 4-D channels-last CPU batch that reaches a convolution in bf16:
    bf16 already, or fp32 under CPU bf16 autocast."""
    if not (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return False
    if x.dtype == torch.bfloat16:
        return True
    autocast = (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return x.dtype == torch.float32 and autocast


def swap_convs(model: nn.Module, takes: Callable[[nn.Module], bool],
               layer: type[nn.Conv2d]) -> int:  # fmt: skip
    """Replace every convolution of `model` that `takes` by a `layer` (an `nn.Conv2d`
    subclass, 3x3, padding 1) holding the same parameters, in place (checkpoints load
    either way); returns how many."""
    replaced = 0
    for name, child in model.named_children():
        if takes(child):
            setattr(model, name, same_conv(child, layer))
            replaced += 1
        else:
            replaced += swap_convs(child, takes, layer)
    return replaced


def same_conv(conv: nn.Conv2d, layer: type[nn.Conv2d]) -> nn.Conv2d:
    """A `layer` (3x3, padding 1) holding `conv`'s parameters, the same tensors."""
    same = layer(conv.in_channels, conv.out_channels, 3, padding=1,
                 bias=conv.bias is not None, device="meta")  # fmt: skip
    same.weight, same.bias = conv.weight, conv.bias
    return same

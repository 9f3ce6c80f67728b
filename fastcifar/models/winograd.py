"""3x3 convolutions as Winograd F(2x2, 3x3) where that is faster: bf16 channels-last
activations on a CPU whose bf16 arithmetic is AVX512-BF16 (`fastcifar._C`'s
`winograd_conv3x3`; `fastcifar/ops/winograd.py`). There oneDNN's direct convolutions
already run at the bf16 matmul peak, so only fewer multiplications make them faster: a
Winograd tile does in 16 what nine taps do in 36. On a CPU with AMX, oneDNN's
convolutions run several times faster than these kernels could, so they stay."""

from __future__ import annotations

import torch
from torch import nn

CHANNEL_MULTIPLE = 16  # the kernel's channel block, in and out (the input's gradient swaps them)


def takes(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution that `WinogradConv2d` computes: a plain
    `nn.Conv2d`, 3x3, stride 1, padding 1, no dilation or groups, channels in multiples
    of 16."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels % CHANNEL_MULTIPLE == 0
        and conv.out_channels % CHANNEL_MULTIPLE == 0
    )


def _bf16_input(x: torch.Tensor) -> bool:
    """Whether `x` reaches the convolution in bf16: bf16 already, or fp32 under CPU bf16
    autocast."""
    if x.dtype == torch.bfloat16:
        return True
    autocast = (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return x.dtype == torch.float32 and autocast


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3x3, padding 1) computed through Winograd F(2x2, 3x3) for CPU bf16
    channels-last batches of an even height and width; anything else goes to
    `F.conv2d`. Parameters and state dict are `nn.Conv2d`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fits = (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.shape[2] % 2 == 0
            and x.shape[3] % 2 == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and _bf16_input(x)
        )
        if not fits:
            return super().forward(x)
        from fastcifar.ops.winograd import winograd_conv3x3

        return winograd_conv3x3(x.to(torch.bfloat16), self.weight, self.bias)


def use_winograd(model: nn.Module) -> int:
    """Replace every convolution of `model` that `takes` by a `WinogradConv2d` holding the
    same parameters, in place (checkpoints load either way); returns how many."""
    replaced = 0
    for name, child in model.named_children():
        if takes(child):
            conv = WinogradConv2d(child.in_channels, child.out_channels, 3, padding=1,
                                  bias=child.bias is not None, device="meta")  # fmt: skip
            conv.weight, conv.bias = child.weight, child.bias
            setattr(model, name, conv)
            replaced += 1
        else:
            replaced += use_winograd(child)
    return replaced


def winograd_available() -> tuple[bool, str]:
    """(available, why): a CPU whose bf16 arithmetic is AVX512-BF16 (not AMX) and
    `fastcifar._C` loaded."""
    from fastcifar.train.device import cpu_instructions

    found = cpu_instructions()
    if found != "AVX512-BF16":
        return False, f"the Winograd convolution is for AVX512-BF16 CPUs, and this one has {found}"
    from fastcifar.ops import native

    return native.load()

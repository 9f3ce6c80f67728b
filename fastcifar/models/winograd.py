"""3x3 convolutions as Winograd F(2x2, 3x3) where that is faster: bf16 channels-last
activations on a CPU whose bf16 arithmetic is AVX512-BF16 (`fastcifar._C`'s
`winograd_conv3x3`; `fastcifar/ops/winograd.py`). There oneDNN's direct convolutions
already run at the bf16 matmul peak, so only fewer multiplications make them faster: a
Winograd tile does in 16 what nine taps do in 36. On a CPU with AMX, oneDNN's
convolutions run several times faster than these kernels could, so they stay."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.models.conv3x3 import bf16_cpu_batch, plain_conv3x3, swap_convs

CHANNEL_MULTIPLE = 16  # the kernel's channel block, in and out (the input's gradient swaps them)


def takes(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution that `WinogradConv2d` computes
    (`plain_conv3x3`, channels in multiples of 16)."""
    return plain_conv3x3(conv, CHANNEL_MULTIPLE)


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3x3, padding 1) computed through Winograd F(2x2, 3x3) for CPU bf16
    channels-last batches of an even height and width; anything else goes to
    `F.conv2d`. Its weight's gradient is oneDNN's, or Winograd's with
    `winograd_weight_grad` (`use_winograd_weight_grad`), as F(2x2, 3x3) or with
    `weight_grad_tile` 4 as F(4x4, 3x3) where the height and width are multiples of 4.
    Parameters and state dict are `nn.Conv2d`'s."""

    winograd_weight_grad = False
    weight_grad_tile = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fits = bf16_cpu_batch(x) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
        if not fits:
            return super().forward(x)
        from fastcifar.ops.winograd import winograd_conv3x3

        tile = self.weight_grad_tile
        tile = tile if x.shape[2] % tile == 0 and x.shape[3] % tile == 0 else 2
        return winograd_conv3x3(x.to(torch.bfloat16), self.weight, self.bias,
                                winograd_weight_grad=self.winograd_weight_grad,
                                weight_grad_tile=tile)  # fmt: skip


def use_winograd(model: nn.Module) -> int:
    """Replace every convolution of `model` that `takes` by a `WinogradConv2d` holding the
    same parameters, in place (checkpoints load either way); returns how many."""
    return swap_convs(model, takes, WinogradConv2d)


def use_winograd_weight_grad(model: nn.Module, tile: int = 2) -> int:
    """Give every `WinogradConv2d` of `model` Winograd's weight gradient, F(2x2, 3x3) or
    with `tile=4` F(4x4, 3x3); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, WinogradConv2d)]
    for layer in layers:
        layer.winograd_weight_grad, layer.weight_grad_tile = True, tile
    return len(layers)


def winograd_available() -> tuple[bool, str]:
    """(available, why): a CPU whose bf16 arithmetic is AVX512-BF16 (not AMX) and
    `fastcifar._C` loaded."""
    from fastcifar.train.device import cpu_instructions

    found = cpu_instructions()
    if found != "AVX512-BF16":
        return False, f"the Winograd convolution is for AVX512-BF16 CPUs, and this one has {found}"
    from fastcifar.ops import native

    return native.load()

"""3x3 convolutions as Winograd F(2x2, 3x3) where that is faster (`fastcifar._C`'s
`winograd_conv3x3`; `fastcifar/ops/winograd.py`): bf16 channels-last activations on a CPU
whose bf16 arithmetic is AVX512-BF16, and fp32 ones on a CPU that trains in fp32 (AVX2,
no bf16 instructions). There oneDNN's direct convolutions already run near the matmul
peak, so only fewer multiplications make them faster: a Winograd tile does in 16 what
nine taps do in 36. On a CPU with AMX, oneDNN's convolutions run several times faster
than these kernels could, so they stay."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.models.conv3x3 import bf16_cpu_batch, fp32_cpu_batch, plain_conv3x3, swap_convs

CHANNEL_MULTIPLE = 16  # the kernel's channel block, in and out (the input's gradient swaps them)
FP32_CAPABILITIES = ("AVX2", "AVX512")  # torch's names for CPUs with AVX2 and FMA


def takes(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution that `WinogradConv2d` computes
    (`plain_conv3x3`, channels in multiples of 16)."""
    return plain_conv3x3(conv, CHANNEL_MULTIPLE)


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3x3, padding 1) computed through Winograd F(2x2, 3x3) for CPU bf16
    or fp32 channels-last batches of an even height and width, fp32 ones as F(4x4, 3x3)
    (`fp32_tile`) where the height and width are multiples of 4; anything else goes to
    `F.conv2d`. Its weight's gradient is oneDNN's, or Winograd's with
    `winograd_weight_grad` (`use_winograd_weight_grad`), as F(2x2, 3x3) or with
    `weight_grad_tile` 4 as F(4x4, 3x3) where the height and width are multiples of 4.
    In bf16 the input's gradient is F(2x2, 3x3)'s, or with `input_grad_tile` 4
    (`use_winograd_input_grad_tile`) F(4x4, 3x3)'s where the size allows. Parameters and
    state dict are `nn.Conv2d`'s."""

    winograd_weight_grad = False
    weight_grad_tile = 2
    input_grad_tile = 2  # bf16; in fp32 the input's gradient takes the forward's tile
    fp32_tile = 4  # fp32 forward and input gradient as F(4x4, 3x3) where the size allows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf16 = bf16_cpu_batch(x)
        fits = (bf16 or fp32_cpu_batch(x)) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
        if not fits:
            return super().forward(x)
        from fastcifar.ops.winograd import winograd_conv3x3

        def fitting(tile: int) -> int:
            return tile if x.shape[2] % tile == 0 and x.shape[3] % tile == 0 else 2

        return winograd_conv3x3(x.to(torch.bfloat16) if bf16 else x, self.weight, self.bias,
                                winograd_weight_grad=self.winograd_weight_grad,
                                weight_grad_tile=fitting(self.weight_grad_tile),
                                tile=2 if bf16 else fitting(self.fp32_tile),
                                input_grad_tile=fitting(self.input_grad_tile) if bf16 else None)  # fmt: skip


def use_winograd(model: nn.Module) -> int:
    """Replace every convolution of `model` that `takes` by a `WinogradConv2d` holding the
    same parameters, in place (checkpoints load either way); returns how many."""
    return swap_convs(model, takes, WinogradConv2d)


def use_winograd_weight_grad(model: nn.Module, tile: int = 2) -> int:
    """Give every `WinogradConv2d` of `model` Winograd's weight gradient, F(2x2, 3x3) or
    with `tile=4` F(4x4, 3x3); returns how many."""
    layers = winograd_layers(model)
    for layer in layers:
        layer.winograd_weight_grad, layer.weight_grad_tile = True, tile
    return len(layers)


def use_winograd_input_grad_tile(model: nn.Module, tile: int) -> int:
    """Give every `WinogradConv2d` of `model` F(2x2, 3x3)'s (`tile=2`) or F(4x4, 3x3)'s
    (`tile=4`) input gradient in bf16; returns how many."""
    layers = winograd_layers(model)
    for layer in layers:
        layer.input_grad_tile = tile
    return len(layers)


def winograd_layers(model: nn.Module) -> list[WinogradConv2d]:
    """The `WinogradConv2d` layers of `model`."""
    return [m for m in model.modules() if isinstance(m, WinogradConv2d)]


def default_grad_tile(amp: str) -> int:
    """The Winograd weight gradient's tile where `--winograd-grad-tile` is unset, for
    training with autocast `amp`: F(2x2, 3x3) (2) in bf16, whose rounding F(4x4, 3x3)
    multiplies by six (its rule is not met); F(4x4, 3x3) (4) in fp32, where its rule held
    (benchmarks/NOTES.md, "F(4x4, 3x3) for the fp32 weight gradient")."""
    return 4 if amp == "none" else 2


def winograd_available(amp: str = "bf16") -> tuple[bool, str]:
    """(available, why) for training with autocast `amp` ("bf16", or "none" for fp32): in
    bf16 a CPU whose bf16 arithmetic is AVX512-BF16 (not AMX), in fp32 one with AVX2 and
    FMA; and `fastcifar._C` loaded."""
    from fastcifar.train.device import cpu_instructions

    found = cpu_instructions()
    if amp == "bf16" and found != "AVX512-BF16":
        return (
            False,
            f"the bf16 Winograd convolution is for AVX512-BF16 CPUs, and this one has {found}",
        )
    if amp == "none" and torch.backends.cpu.get_cpu_capability() not in FP32_CAPABILITIES:
        return False, f"the fp32 Winograd convolution needs AVX2 and FMA, and this CPU has {found}"
    if amp not in ("bf16", "none"):
        return False, f"the Winograd convolution runs in bf16 or fp32, not {amp}"
    from fastcifar.ops import native

    return native.load()


def fp32_by_default() -> bool:
    """Whether `--winograd auto` turns fp32 Winograd on: on a CPU without bf16
    instructions or AVX-512 (AVX2 only), where training runs in fp32 and the kernel's rule
    held (benchmarks/NOTES.md, "fp32 Winograd on the AVX2 CPU")."""
    from fastcifar.train.device import cpu_instructions

    return cpu_instructions() == "AVX2"

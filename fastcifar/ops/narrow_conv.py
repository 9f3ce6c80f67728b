"""A 3x3, stride-1, padding-1 convolution of fp32 channels-last CPU batches with few input
channels (a network's first layer), whose weight and bias gradients come from
`fastcifar._C`'s `conv3x3_narrow_weight_grad` (`kernels/wgrad_narrow_cpu.cpp`, AVX2 and
FMA) in place of oneDNN's backward-weights. The forward and the input's gradient stay
oneDNN's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcifar.ops.amx_conv import conv3x3_grads

OUTPUT_MULTIPLE = 8  # output channels: the kernel's 8 floats a vector


class _NarrowGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        return conv3x3_grads(ctx, grad, x, weight, torch.ops.fastcifar.conv3x3_narrow_weight_grad)


def narrow_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for x an fp32 channels-last CPU batch, output
    channels in multiples of 8; its weight and bias gradients from the native kernel."""
    return _NarrowGradConv.apply(x, weight, bias)

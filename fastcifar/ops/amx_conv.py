"""A 3x3, stride-1, padding-1 convolution of bf16 channels-last CPU batches whose weight
and bias gradients come from `fastcifar._C`'s `conv3x3_weight_grad`, a tiled product on
AMX (`kernels/wgrad_amx_cpu.cpp`), in place of oneDNN's backward-weights. The forward
and the input's gradient stay oneDNN's. The gradients are summed in fp32 and returned
in the parameters' dtype, not rounded through bf16 on the way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNEL_MULTIPLE = 32  # the kernel's two tiles of 16 channels a side


def bf16_conv3x3(x, weight, bias):
    """(oneDNN's `F.conv2d(x, w, b, padding=1)`, w): the weight and bias cast to bf16, x a
    bf16 batch, outside autocast."""
    w = weight.to(torch.bfloat16)
    b = bias.to(torch.bfloat16) if bias is not None else None
    with torch.autocast("cpu", enabled=False):
        return F.conv2d(x, w, b, padding=1), w


def bf16_grad(grad):
    """An output gradient as the backward's kernels take it: channels-last bf16."""
    return grad.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)


def conv3x3_input_grad(grad, x, w):
    """oneDNN's gradient of `F.conv2d(x, w, padding=1)`'s input x from its output's."""
    return torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
    )[0]


def conv3x3_grads(ctx, grad, x, w, weight_grad):
    """The backward of a 3x3 convolution whose weight and bias gradients come from the
    native op `weight_grad(grad, x)`: (input, weight, bias) gradients, each where `ctx`
    needs it, the input's from oneDNN."""
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = conv3x3_input_grad(grad, x, w)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_b = weight_grad(grad, x)
        grad_b = grad_b if ctx.has_bias else None
    return grad_x, grad_w, grad_b


class _AmxGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous(memory_format=torch.channels_last)
        out, w = bf16_conv3x3(x, weight, bias)
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return conv3x3_grads(ctx, bf16_grad(grad), x, w, torch.ops.fastcifar.conv3x3_weight_grad)


def amx_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` in bf16 for x bf16 channels-last on the CPU,
    channels in multiples of 32; its weight and bias gradients from the AMX kernel."""
    return _AmxGradConv.apply(x, weight, bias)

"""A ReLU, training-mode BatchNorm and the 3x3 convolution after them (stride 1, padding
1), as one autograd function whose backward makes one pass over g = dL/dy and x where
`fastcifar.ops.relu_bn` makes two: bf16 channels-last CPU batches on a CPU with AMX,
channels in multiples of 32.

Forward is `relu_bn`'s two passes, then oneDNN's convolution of y. Backward, with G the
convolution's output gradient: oneDNN's input gradient g, the weight and bias gradients
dW and db from the AMX kernel (`fastcifar.ops.amx_conv`), and with them the two sums the
input's gradient needs before its pass. The convolution is linear in y, so sum(g y) over
the pixels is the sum of W dW over the output channels and taps, and sum(g) is the sum
of W times G's sum over each tap's window (the bias gradient less the border rows and
columns that tap misses, which the AMX kernel sums as it packs G). With y = scale (h -
mean) + bias (h = relu(x)), scale sum(g (h - mean)) = sum(g y) - bias sum(g): all the
input gradient's terms need, no division. The one pass then writes the input's gradient
and sums g and g h over the pixels, for the BatchNorm weight's and bias's gradients as
`relu_bn` has them.

The two sums before the pass are those of the exact input gradient (W times G, as the
convolution took them); `relu_bn` sums its bf16 rounding. They differ by that rounding.
"""

from __future__ import annotations

import torch

from fastcifar.ops.amx_conv import bf16_conv3x3, bf16_grad, conv3x3_input_grad
from fastcifar.ops.relu_bn import (
    batch_statistics,
    input_grad_terms,
    parameter_grads,
    update_running_statistics,
)


class _ReluBatchNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv_weight, conv_bias, eps):
        mean, var, invstd, scale, shift = batch_statistics(x, weight, bias, eps)
        y = torch.ops.fastcifar.relu_affine(x, scale.float(), shift.float())
        out, w = bf16_conv3x3(y, conv_weight, conv_bias)
        ctx.save_for_backward(x, y, w, weight, bias, mean, invstd)
        ctx.has_conv_bias = conv_bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _mean_grad, _var_grad):
        x, y, w, weight, bias, mean, invstd = ctx.saved_tensors
        grad = bf16_grad(grad)
        g = conv3x3_input_grad(grad, y, w)
        grad_w, grad_b, windows = torch.ops.fastcifar.conv3x3_weight_grad(grad, y, True)
        sum_g, scaled_centred = sums_through_conv(w, grad_w, windows, bias)
        terms = input_grad_terms(sum_g, scaled_centred, x, weight, mean, invstd)
        grad_x, sums = torch.ops.fastcifar.relu_affine_backward_moments(g, x, *terms)
        grad_weight, grad_bias = parameter_grads(sums, weight, mean, invstd)
        grad_b = grad_b if ctx.has_conv_bias else None
        return grad_x, grad_weight, grad_bias, grad_w, grad_b, None


def sums_through_conv(w, grad_w, windows, bias):
    """sum(g) and sum(g y) - bias sum(g) per channel (float64), g the gradient the
    convolution (bf16 weight w) passes to its input y, from the convolution's weight
    gradient and its output gradient's sums over each tap's window."""
    c_out, c_in = w.shape[:2]
    # (c_out, 3, 3, c_in) rows: the channels-last weight's own memory order
    w_rows = w.permute(0, 2, 3, 1).reshape(c_out * 9, c_in).float()
    dw_rows = grad_w.permute(0, 2, 3, 1).reshape(c_out * 9, c_in)
    sum_gy = (w_rows * dw_rows).sum(0).double()
    sum_g = torch.mv(w_rows.t(), windows.reshape(-1)).double()
    return sum_g, sum_gy - bias.double() * sum_g


def relu_batch_norm_conv(x, weight, bias, running_mean, running_var, momentum, eps,
                         conv_weight, conv_bias) -> torch.Tensor:  # fmt: skip
    """`F.conv2d(F.batch_norm(F.relu(x), ..., training=True), conv_weight, conv_bias,
    padding=1)` in bf16, for a bf16 batch `relu_bn_fits` takes with channels in multiples
    of 32; the running statistics updated as BatchNorm does."""
    out, mean, var = _ReluBatchNormConv.apply(x, weight, bias, conv_weight, conv_bias, eps)
    update_running_statistics(running_mean, running_var, mean, var, x, momentum)
    return out

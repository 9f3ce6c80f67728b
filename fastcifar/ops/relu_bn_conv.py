"""A ReLU, training-mode BatchNorm and the 3x3 convolution after them (stride 1, padding
1), as one autograd function, whose backward needs no pass of its own for the BatchNorm's
two sums: bf16 channels-last CPU batches on a CPU with AMX, channels in multiples of 32.

Forward is `fastcifar.ops.relu_bn`'s two passes, then oneDNN's convolution of y. Backward,
with G the convolution's output gradient: oneDNN's input gradient g = dL/dy, the weight
and bias gradients dW and db from the AMX kernel (`fastcifar.ops.amx_conv`), and then
the BatchNorm's sums per channel without reading g and x again. The convolution is linear
in y, so sum(g y) over the pixels is the sum of W dW over the output channels and taps,
and sum(g) is the sum of W times G's sum over each tap's window (`conv3x3_tap_sums`: the
bias gradient less the border rows and columns that tap misses). With y = scale (h -
mean) + bias (h = relu(x)), sum(g (h - mean)) = (sum(g y) - bias sum(g)) / scale. The
input's gradient is then `relu_affine_backward`'s one pass, as in `relu_bn`.

The division by scale (the BatchNorm weight times invstd) needs the weight away from
zero: where any |weight| is below MIN_WEIGHT, the step sums g and g h over the pixels as
`relu_bn` does. The sums are those of the exact input gradient (the product of W and G,
both as the convolution took them) where `relu_bn` sums its bf16 rounding; they differ by
that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcifar.ops.relu_bn import backward_terms, batch_statistics, update_running_statistics

MIN_WEIGHT = 1e-2  # below this |BatchNorm weight| the sums come from a pass over g and x


class _ReluBatchNormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv_weight, conv_bias, eps):
        mean, var, invstd, scale, shift = batch_statistics(x, weight, bias, eps)
        y = torch.ops.fastcifar.relu_affine(x, scale.float(), shift.float())
        w = conv_weight.to(torch.bfloat16)
        b = conv_bias.to(torch.bfloat16) if conv_bias is not None else None
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(y, w, b, padding=1)
        ctx.save_for_backward(x, y, w, weight, bias, mean, invstd)
        ctx.has_conv_bias = conv_bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _mean_grad, _var_grad):
        x, y, w, weight, bias, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
        g = torch.ops.aten.convolution_backward(
            grad, y, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
        grad_w, grad_b = torch.ops.fastcifar.conv3x3_weight_grad(grad, y)
        if bool((weight.abs() >= MIN_WEIGHT).all()):
            sum_g, centred = sums_through_conv(grad, w, grad_w, grad_b, weight, bias, invstd)
        else:
            sums = torch.ops.fastcifar.relu_grad_moments(g, x)
            sum_g, centred = sums[0], sums[1] - mean * sums[0]
        terms, grad_weight, grad_bias = backward_terms(sum_g, centred, x, weight, mean, invstd)
        grad_x = torch.ops.fastcifar.relu_affine_backward(g, x, *terms)
        grad_b = grad_b if ctx.has_conv_bias else None
        return grad_x, grad_weight, grad_bias, grad_w, grad_b, None


def sums_through_conv(grad, w, grad_w, grad_b, weight, bias, invstd):
    """sum(g) and sum(g (h - mean)) per channel (float64), g the gradient the convolution
    (bf16 weight w) passes to its input y from its output's gradient `grad`, from the
    convolution's weight and bias gradients and `grad`'s border."""
    c_out, c_in = w.shape[:2]
    # (c_out, 3, 3, c_in) rows: the channels-last weight's own memory order
    w_rows = w.permute(0, 2, 3, 1).reshape(c_out * 9, c_in).float()
    dw_rows = grad_w.permute(0, 2, 3, 1).reshape(c_out * 9, c_in)
    sum_gy = (w_rows * dw_rows).sum(0).double()
    windows = torch.ops.fastcifar.conv3x3_tap_sums(grad, grad_b)  # (c_out, 3, 3)
    sum_g = torch.mv(w_rows.t(), windows.reshape(-1)).double()
    return sum_g, (sum_gy - bias.double() * sum_g) / (weight.double() * invstd)


def relu_batch_norm_conv(x, weight, bias, running_mean, running_var, momentum, eps,
                         conv_weight, conv_bias) -> torch.Tensor:  # fmt: skip
    """`F.conv2d(F.batch_norm(F.relu(x), ..., training=True), conv_weight, conv_bias,
    padding=1)` in bf16, for a bf16 batch `relu_bn_fits` takes with channels in multiples
    of 32; the running statistics updated as BatchNorm does."""
    out, mean, var = _ReluBatchNormConv.apply(x, weight, bias, conv_weight, conv_bias, eps)
    update_running_statistics(running_mean, running_var, mean, var, x, momentum)
    return out

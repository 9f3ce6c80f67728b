"""A ReLU followed by training-mode BatchNorm, as one autograd function over `fastcifar._C`'s
kernels (`kernels/relu_bn_cpu.cpp`): channels-last CPU activations, channels in multiples
of 16. The ReLU is recomputed from its input x wherever it is needed, so forward reads x
twice and writes y once, and backward reads (grad, x) twice and writes x's gradient once;
the per-channel arithmetic in between (C values) is done here in float64.

With h = relu(x) over M = N * H * W pixels: mean = sum(h) / M, var = sum(h^2) / M - mean^2
(biased, as BatchNorm normalises), y = h * scale + shift with scale = weight / sqrt(var +
eps) and shift = bias - mean * scale. Backward, with g = dL/dy: dbias = sum(g), dweight =
(sum(g h) - mean sum(g)) * invstd, and for x > 0 dx = g * scale + h * k + c, with k = -weight
invstd^3 (sum(g h) - mean sum(g)) / M and c = -scale sum(g) / M - k mean (0 elsewhere).

Followed by a 2x2 max pool, the affine pass pools as it goes and keeps each window's
winner and its h; backward, g is the pooled gradient at the winners and zero elsewhere,
so the two sums come from the pooled tensors and the input's gradient is one pass.
"""

from __future__ import annotations

import functools

import torch

CHANNEL_MULTIPLE = 16  # the kernels' channel block


def relu_bn_fits(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: a CPU fp32 channels-last batch (bf16 too where the CPU
    has AVX-512) with channels in multiples of 16 and more than one value per channel."""
    return (
        x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and kernels_take_bf16()))
        and x.dim() == 4
        and x.shape[1] % CHANNEL_MULTIPLE == 0
        and x.numel() > x.shape[1]
        and x.is_contiguous(memory_format=torch.channels_last)
    )


@torch.compiler.assume_constant_result
@functools.cache
def kernels_take_bf16() -> bool:
    """Whether this CPU's kernels take bf16: AVX-512's do, AVX2's take fp32 only."""
    from fastcifar.ops import native

    return native.avx512_kernels_loaded()


class _ReluBatchNorm(torch.autograd.Function):
    """With `max_pool` the affine pass also pools, and the backward's two sums come from
    the pooled gradient and each window winner's relu(x): the gradient is zero elsewhere."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, max_pool):
        mean, var, invstd, scale, shift = batch_statistics(x, weight, bias, eps)
        if max_pool:
            y, winner_relu, where = torch.ops.fastcifar.relu_affine_max_pool(
                x, scale.float(), shift.float()
            )
            ctx.save_for_backward(x, weight, mean, invstd, winner_relu, where)
        else:
            y = torch.ops.fastcifar.relu_affine(x, scale.float(), shift.float())
            ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad, _mean_grad, _var_grad):
        x, weight, mean, invstd, *pooled = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last).to(x.dtype)
        sums = torch.ops.fastcifar.relu_grad_moments(grad, pooled[0] if pooled else x)
        scaled = (sums[1] - mean * sums[0]) * weight.double() * invstd  # scale sum(g (h - mean))
        terms = input_grad_terms(sums[0], scaled, x, weight, mean, invstd)
        grad_weight, grad_bias = parameter_grads(sums, weight, mean, invstd)
        if pooled:
            grad_x = torch.ops.fastcifar.relu_affine_max_pool_backward(grad, pooled[1], x, *terms)
        else:
            grad_x = torch.ops.fastcifar.relu_affine_backward(grad, x, *terms)
        return grad_x, grad_weight, grad_bias, None, None


def relu_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    max_pool: bool = False,
) -> torch.Tensor:
    """`F.batch_norm(F.relu(x), running_mean, running_var, weight, bias, training=True,
    momentum, eps)` for a batch `relu_bn_fits` takes, the running statistics updated as
    BatchNorm does (the unbiased variance); with `max_pool`, then `F.max_pool2d(y, 2)`
    (x needs 2 x 2 pixels or more)."""
    y, mean, var = _ReluBatchNorm.apply(x, weight, bias, eps, max_pool)
    update_running_statistics(running_mean, running_var, mean, var, x, momentum)
    return y


def relu_batch_norm_eval(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    max_pool: bool = False,
) -> torch.Tensor:
    """`F.batch_norm(F.relu(x), running_mean, running_var, weight, bias, training=False,
    eps=eps)` for a batch `relu_bn_fits` takes, in one pass without autograd (for
    evaluation under `torch.no_grad()` or `torch.inference_mode()`); with `max_pool`, then
    `F.max_pool2d(y, 2)` in the same pass (x needs 2 x 2 pixels or more)."""
    _, scale, shift = affine_terms(running_mean.double(), running_var.double(), weight, bias, eps)
    if max_pool:
        return torch.ops.fastcifar.relu_affine_max_pool(x, scale.float(), shift.float())[0]
    return torch.ops.fastcifar.relu_affine(x, scale.float(), shift.float())


def batch_statistics(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(mean, var, invstd, scale, shift) of relu(x) per channel, float64: y = relu(x) *
    scale + shift is the BatchNorm's output."""
    pixels = x.numel() // x.shape[1]
    sums = torch.ops.fastcifar.relu_moments(x)
    mean = sums[0] / pixels
    var = (sums[1] / pixels - mean * mean).clamp_min(0)
    return mean, var, *affine_terms(mean, var, weight, bias, eps)


def affine_terms(mean, var, weight, bias, eps: float):
    """(invstd, scale, shift) per channel, float64: BatchNorm normalising by (mean, var)
    is y = h * scale + shift."""
    invstd = torch.rsqrt(var + eps)
    scale = weight.double() * invstd
    return invstd, scale, bias.double() - mean * scale


def input_grad_terms(sum_g, scaled_centred, x, weight, mean, invstd):
    """The input gradient's per-channel terms (scale, k, c) as floats, from sum(g) and
    scale * sum(g (h - mean)) per channel (float64)."""
    pixels = x.numel() // x.shape[1]
    scale = weight.double() * invstd
    k = -invstd * invstd * scaled_centred / pixels
    c = -scale * sum_g / pixels - k * mean
    return scale.float(), k.float(), c.float()


def parameter_grads(sums, weight, mean, invstd):
    """The weight's and bias's gradients from the sums of (g, g h) per channel (float64)."""
    centred = sums[1] - mean * sums[0]  # sum(g (h - mean))
    return (centred * invstd).to(weight.dtype), sums[0].to(weight.dtype)


def update_running_statistics(running_mean, running_var, mean, var, x, momentum) -> None:
    """BatchNorm's running statistics moved toward the batch's (the unbiased variance);
    nothing where they are not tracked (None)."""
    if running_mean is None or running_var is None:
        return
    pixels = x.numel() // x.shape[1]
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        unbiased = var * pixels / max(pixels - 1, 1)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)

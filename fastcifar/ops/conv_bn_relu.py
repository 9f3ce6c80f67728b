"""Triton-fused 3x3 conv + BatchNorm + ReLU for training and inference (CerberusNet's unit).

Reading order: the launchers of the Triton kernels (in `fused_kernels`, with the tiles
they are autotuned over), the torch custom ops (with fake implementations and autograd,
so `torch.compile` traces them), and the plain eager reference of the same block.

Layout: activations NHWC (channels-last NCHW tensors viewed as NHWC), weights as
(9, C_in, C_out). Training forward is two kernels: an implicit-GEMM convolution whose
epilogue adds the bias, applies the ReLU when it comes first (the paper's conv -> ReLU
-> BN), and accumulates each channel's sum and sum of squares for BatchNorm; then one
light pass normalises (and applies the ReLU for conv -> BN -> ReLU). Backward: one
reduction pass and one elementwise pass for BatchNorm and ReLU (which also sums the bias
gradient), the convolution kernel again on flipped, transposed weights for the input
gradient, and a pixel-reduction GEMM for the weight gradient. In eval mode BatchNorm
becomes a per-channel affine folded into the convolution's epilogue: one kernel per
unit. Accumulation and statistics are fp32.

Under `TRITON_INTERPRET=1` (the CPU) operands are upcast to fp32 before arithmetic,
because the interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from fastcifar.ops.fused_kernels import (
    INTERPRET,
    TMA_CONV_TILES,
    WGRAD_PIXEL_STEP,
    WGRAD_TILES,
    affine_kernel,
    bn_backward_apply_kernel,
    bn_backward_reduce_kernel,
    conv3x3_kernel,
    conv3x3_tma_kernel,
    conv3x3_wgrad_kernel,
    conv3x3_wgrad_tma_kernel,
)

# FASTCIFAR_CONV_LOOP=flat runs the convolution's reduction as one loop over 9 x C_in
# instead of nine taps of C_in each (the default, "nested"); =tma loads its operands with
# Hopper's tensor memory accelerator where the layer allows, the flat loop elsewhere.
# Experiments, untimed yet.
CONV_LOOP = os.environ.get("FASTCIFAR_CONV_LOOP", "nested")
ORDERS = ("act_bn", "bn_act")


# ---------------------------------------------------------------- launchers

# Tiles of the elementwise and reduction passes over (pixels x channels).
BLOCK_M, BLOCK_N = (32, 32) if INTERPRET else (64, 64)


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype in (torch.float16, torch.bfloat16)


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 exactly when cuDNN may, so fused and eager agree."""
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators and BatchNorm statistics: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _wgrad_splits(tiles: int, pixels: int, device: torch.device) -> int:
    """Pixel splits for the weight gradient: about four programs per multiprocessor."""
    if INTERPRET or device.type != "cuda":
        return 1  # the interpreter runs programs one by one: more of them only cost time
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(pixels, BLOCK_M), target // tiles))


def conv3x3(x: torch.Tensor, w9: torch.Tensor, bias: torch.Tensor | None, *, relu_first=False,
            scale=None, shift=None, relu_last=False, stats=False):  # fmt: skip
    """Convolve NHWC `x` (N, H, W, C_in) with `w9` (9, C_in, C_out); returns (y, sum, sumsq),
    the per-channel sums only with `stats` (otherwise unset)."""
    n, h, w, c_in = x.shape
    c_out = w9.shape[2]
    y = torch.empty((n, h, w, c_out), device=x.device, dtype=x.dtype)
    # fp64: no cancellation; zeroed by the kernel's pre-hook when it sums (stats=True)
    sums = torch.empty((2, c_out), device=x.device, dtype=torch.float64)
    dummy = sums[0]

    def grid(tile):
        return (triton.cdiv(n * h * w, tile["BLOCK_M"]), triton.cdiv(c_out, tile["BLOCK_N"]))

    if CONV_LOOP == "tma" and tma_fits(x, w9):
        kernel, operands, loop = conv3x3_tma_kernel, _descriptors(x, w9), {}
    else:  # under "tma", what TMA cannot take runs the flat loop: CerberusNet's first
        # layer's 27 (tap, channel) pairs in one step of 32, not nine steps of 3 in 32
        flat = CONV_LOOP in ("flat", "tma")
        kernel, operands, loop = conv3x3_kernel, (x, w9), {"FLAT_K": flat}
    kernel[grid](
        *operands, bias if bias is not None else dummy, y,
        scale if scale is not None else dummy, shift if shift is not None else dummy, sums[0], sums[1],
        n, h, w, c_in, c_out, RELU_FIRST=relu_first, AFFINE=scale is not None, RELU_LAST=relu_last,
        STATS=stats, HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        ACC=_acc(x.dtype), **loop,
    )  # fmt: skip
    return y, sums[0], sums[1]


def tma_fits(x: torch.Tensor, w9: torch.Tensor) -> bool:
    """Whether the TMA convolution takes NHWC `x` and weights `w9`: as `_tma_takes`, and
    input channels that every tile's BLOCK_K divides (a step inside one tap)."""
    return _tma_takes(x, w9, min(t[0] for t in TMA_CONV_TILES)) and (
        x.shape[-1] % max(t[2] for t in TMA_CONV_TILES) == 0
    )


def tma_weight_grad_fits(x: torch.Tensor, dy: torch.Tensor) -> bool:
    """Whether the TMA weight gradient takes NHWC `x` and `dy`: as `_tma_takes`."""
    return _tma_takes(x, dy, min(t[0] for t in WGRAD_TILES))


def _tma_takes(x: torch.Tensor, other: torch.Tensor, tile_pixels: int) -> bool:
    """Whether TMA can read NHWC `x` in boxes of whole image rows and `other` as a matrix
    over its last dimension (`_descriptors`): 16-bit values on a Hopper-or-later GPU (or
    the interpreter), both contiguous with 16-byte aligned starts and rows (CerberusNet's
    first layer, with 3 channels, takes the pointer kernels), image sizes powers of two
    no wider than the smallest tile."""
    _, h, w, _ = x.shape
    on_hopper = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return (
        (INTERPRET or on_hopper)
        and x.dtype in (torch.float16, torch.bfloat16)
        and all(
            t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[-1] % 8 == 0
            for t in (x, other)
        )  # fmt: skip
        and all(size & (size - 1) == 0 for size in (h, w))
        and w <= tile_pixels
    )


def _descriptors(x: torch.Tensor, other: torch.Tensor):
    """Tensor descriptors of NHWC `x` (4-D) and of `other` as a matrix over its last
    dimension (the weights as (9 x C_in, C_out), a gradient as (pixels, C_out)); their
    boxes are set per tile by the kernel's pre-hook."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor.from_tensor(x, [1, 1, x.shape[2], 8]),
            TensorDescriptor.from_tensor(other.reshape(-1, other.shape[-1]), [8, 8]))  # fmt: skip


def _grid2d(pixels: int, channels: int):
    return (triton.cdiv(pixels, BLOCK_M), triton.cdiv(channels, BLOCK_N))


def affine(v: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
    out = torch.empty_like(v)
    c = v.shape[-1]
    affine_kernel[_grid2d(v.numel() // c, c)](v, out, scale, shift, v.numel() // c, c, RELU=relu,
                                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)  # fmt: skip
    return out


def conv3x3_weight_grad(
    x: torch.Tensor, dy: torch.Tensor, splits: int | None = None
) -> torch.Tensor:
    """dw (9, C_in, C_out) in fp32 of NHWC `x` and `dy`; `splits` overrides the split-K count."""
    n, h, w, c_in = x.shape
    c_out = dy.shape[-1]
    dw = torch.empty(
        (9, c_in, c_out), device=x.device, dtype=stat_dtype(x.dtype)
    )  # zeroed by the pre-hook
    _, ci_tile, co_tile, _ = WGRAD_TILES[0]  # the first candidate sizes the split count
    tiles = triton.cdiv(c_in, ci_tile) * triton.cdiv(c_out, co_tile) * 9
    pixels = n * h * w
    splits = splits or _wgrad_splits(tiles, pixels, x.device)
    step = WGRAD_PIXEL_STEP
    per_split = triton.cdiv(triton.cdiv(pixels, splits), step) * step

    def grid(tile):
        return (triton.cdiv(c_in, tile["BLOCK_CI"]), triton.cdiv(c_out, tile["BLOCK_CO"]),
                9 * triton.cdiv(pixels, per_split))  # fmt: skip

    if CONV_LOOP == "tma" and tma_weight_grad_fits(x, dy):
        kernel, operands = conv3x3_wgrad_tma_kernel, _descriptors(x, dy)
    else:
        kernel, operands = conv3x3_wgrad_kernel, (x, dy)
    kernel[grid](*operands, dw, n, h, w, c_in, c_out, per_split, UPCAST=_upcast(x.dtype),
                 PRECISION=_precision(x.dtype), ACC=_acc(x.dtype))  # fmt: skip
    return dw


def to_w9(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (9, C_in, C_out), contiguous, in the activations' dtype."""
    return (
        weight.permute(2, 3, 1, 0)
        .reshape(9, weight.shape[1], weight.shape[0])
        .to(dtype)
        .contiguous()
    )


def to_w9_transposed(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The input gradient's weights: flipped in space, input and output channels swapped."""
    return (
        weight.flip(2, 3)
        .permute(2, 3, 0, 1)
        .reshape(9, weight.shape[0], weight.shape[1])
        .to(dtype)
        .contiguous()
    )


# ---------------------------------------------------------------- custom ops


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """A channels-last NCHW tensor as its NHWC view (a copy only when not channels-last)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _nchw(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 3, 1, 2)


@torch.library.custom_op("fastcifar::conv_bn_relu_train", mutates_args=())
def conv_bn_relu_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                       beta: torch.Tensor, eps: float, order: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Training forward: (out, v, mean, var). v is what BatchNorm normalised (the ReLU
    output for act_bn, the conv output for bn_act), kept for backward; var is biased."""
    xh = _nhwc(x)
    v, s, sq = conv3x3(
        xh, to_w9(weight, x.dtype), bias.to(x.dtype), relu_first=order == "act_bn", stats=True
    )
    count = v.numel() // v.shape[-1]
    mean64 = s / count
    stat = stat_dtype(x.dtype)
    var = (sq / count - mean64 * mean64).clamp_min(0).to(stat)
    mean = mean64.to(stat)
    scale = gamma.to(stat) * torch.rsqrt(var + eps)
    shift = beta.to(stat) - mean * scale
    out = affine(v, scale, shift, relu=order == "bn_act")
    return _nchw(out), _nchw(v), mean, var


@conv_bn_relu_train.register_fake
def _(x, weight, bias, gamma, beta, eps, order):
    n, _, h, w = x.shape
    c = weight.shape[0]
    act = x.new_empty((n, h, w, c)).permute(0, 3, 1, 2)
    stat = x.new_empty((c,), dtype=stat_dtype(x.dtype))
    return act, x.new_empty((n, h, w, c)).permute(0, 3, 1, 2), stat, stat.clone()


@torch.library.custom_op("fastcifar::conv_bn_relu_backward", mutates_args=())
def conv_bn_relu_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, v: torch.Tensor,
                          mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                          eps: float, order: str, input_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dweight, dbias, dgamma, dbeta) of the training forward; without `input_grad`
    (the network's first unit: its input needs no gradient) dx is empty, not computed."""
    dz, vh, xh = _nhwc(dout).to(v.dtype), _nhwc(v), _nhwc(x)
    c = vh.shape[-1]
    pixels = vh.numel() // c
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(mean.dtype) * rstd
    shift = beta.to(mean.dtype) - mean * scale
    # separate tensors, not rows of one: a custom op's outputs must not alias each other
    dsum, dxhat_sum, dbias = (torch.zeros(c, device=x.device, dtype=mean.dtype) for _ in range(3))
    relu_last = order == "bn_act"
    bn_backward_reduce_kernel[_grid2d(pixels, c)](
        dz, vh, mean, rstd, scale, shift, dsum, dxhat_sum, pixels, c,
        RELU_LAST=relu_last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    dconv = torch.empty_like(vh)
    bn_backward_apply_kernel[_grid2d(pixels, c)](
        dz, vh, dconv, mean, rstd, gamma.to(mean.dtype).contiguous(), scale, shift, dsum, dxhat_sum, dbias,
        pixels, c,
        RELU_FIRST=order == "act_bn", RELU_LAST=relu_last, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    if input_grad:
        dx, _, _ = conv3x3(dconv, to_w9_transposed(weight, dconv.dtype), None)
        dx = _nchw(dx)
    else:
        dx = x.new_empty(0)
    dw9 = conv3x3_weight_grad(xh, dconv)
    dweight = (
        dw9.reshape(3, 3, weight.shape[1], weight.shape[0]).permute(3, 2, 0, 1).to(weight.dtype)
    )
    return (dx, dweight.contiguous(), dbias.to(weight.dtype), dxhat_sum.to(gamma.dtype),
            dsum.to(beta.dtype))  # fmt: skip


@conv_bn_relu_backward.register_fake
def _(dout, x, weight, v, mean, var, gamma, beta, eps, order, input_grad=True):
    n, c_in, h, w = x.shape
    dx = x.new_empty((n, h, w, c_in)).permute(0, 3, 1, 2) if input_grad else x.new_empty(0)
    return (
        dx,
        torch.empty_like(weight),
        weight.new_empty((weight.shape[0],)),
        torch.empty_like(gamma),
        torch.empty_like(beta),
    )


def _setup_context(ctx, inputs, output):
    x, weight, _, gamma, beta, eps, order = inputs
    _, v, mean, var = output
    ctx.save_for_backward(x, weight, v, mean, var, gamma, beta)
    ctx.eps, ctx.order = eps, order


def _backward(ctx, dout, _dv, _dmean, _dvar):
    x, weight, v, mean, var, gamma, beta = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    dx, dw, db, dgamma, dbeta = conv_bn_relu_backward(dout.contiguous(memory_format=torch.channels_last),
                                                      x, weight, v, mean, var, gamma, beta, ctx.eps, ctx.order,
                                                      input_grad)  # fmt: skip
    return dx if input_grad else None, dw, db, dgamma, dbeta, None, None


conv_bn_relu_train.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastcifar::conv_bn_relu_eval", mutates_args=())
def conv_bn_relu_eval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor, order: str) -> torch.Tensor:  # fmt: skip
    """Inference: one kernel. For bn_act BatchNorm folds into the weights and bias; for
    act_bn (ReLU first) it is an affine in the epilogue, after the ReLU."""
    if order == "bn_act":
        w = weight * scale[:, None, None, None]
        y, _, _ = conv3x3(
            _nhwc(x), to_w9(w, x.dtype), (bias * scale + shift).to(x.dtype), relu_last=True
        )
    else:
        y, _, _ = conv3x3(_nhwc(x), to_w9(weight, x.dtype), bias.to(x.dtype), relu_first=True,
                          scale=scale.to(stat_dtype(x.dtype)).contiguous(),
                          shift=shift.to(stat_dtype(x.dtype)).contiguous())  # fmt: skip
    return _nchw(y)


@conv_bn_relu_eval.register_fake
def _(x, weight, bias, scale, shift, order):
    n, _, h, w = x.shape
    return x.new_empty((n, h, w, weight.shape[0])).permute(0, 3, 1, 2)


# FLOPs for `torch.utils.flop_counter` (`fastcifar profile`, model summaries): the 3x3
# convolution's multiply-adds, twice over for the backward's input and weight gradients;
# the BatchNorm and ReLU work is not counted, as for the eager ops.


def _conv_flops(x_shape, weight_shape) -> int:
    n, c_in, h, w = x_shape
    return 2 * n * h * w * c_in * weight_shape[0] * weight_shape[2] * weight_shape[3]


@register_flop_formula(
    [torch.ops.fastcifar.conv_bn_relu_train, torch.ops.fastcifar.conv_bn_relu_eval]
)
def _(x_shape, weight_shape, *_, **__) -> int:
    return _conv_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.fastcifar.conv_bn_relu_backward)
def _(dout_shape, x_shape, weight_shape, *args, **kwargs) -> int:
    input_grad = args[7] if len(args) > 7 else kwargs.get("input_grad", True)
    return (2 if input_grad else 1) * _conv_flops(x_shape, weight_shape)


# ---------------------------------------------------------------- eager reference


def reference_conv_bn_relu(x, weight, bias, gamma, beta, running_mean, running_var, *, training: bool,
                           momentum: float = 0.1, eps: float = 1e-5, order: str = "act_bn"):  # fmt: skip
    """The same block in plain PyTorch ops (updates the running statistics in training)."""
    y = torch.nn.functional.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1)
    if order == "act_bn":
        y = torch.relu(y)
    y = torch.nn.functional.batch_norm(
        y, running_mean, running_var, gamma, beta, training, momentum, eps
    )
    return torch.relu(y) if order == "bn_act" else y

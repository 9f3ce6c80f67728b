"""The native extension `fastcifar._C` (built from kernels/ by CMakeLists.txt): loaded
once, with the fake implementations `torch.compile` needs to trace its operators.

`augment_batch` is the fused crop + flip + cutout + normalise + cast of one training
batch, from uint8 NHWC images straight to the model's input; its reference is
`fastcifar.data.augment.reference_augment`. `max_pool2x2` is `F.max_pool2d(x, 2)` for
channels-last activations on a CPU with AVX-512 (`fastcifar.models.pooling`), with its
backward from the window positions the forward keeps. `winograd_conv3x3` is a 3x3
convolution of bf16 channels-last activations on an AVX512-BF16 CPU
(`fastcifar.models.winograd`; its autograd is `fastcifar.ops.winograd`'s). The
`relu_*` operators are a ReLU followed by training-mode BatchNorm over channels-last
activations on a CPU with AVX-512 (bf16 and fp32) or AVX2 (fp32) (`fastcifar.models.relu_bn`; autograd and per-channel
arithmetic in `fastcifar.ops.relu_bn`). `conv3x3_weight_grad` is a 3x3 convolution's weight and bias
gradients on AMX tiles (`fastcifar.models.amx_conv`, `fastcifar.ops.amx_conv`);
`amx_tiles_usable` says whether this CPU and kernel let it run; with `windows` it also sums
the output gradient over each tap's window (`fastcifar.ops.relu_bn_conv`).
`conv3x3_narrow_weight_grad` is the same gradients for fp32 layers with few input
channels on a CPU with AVX2 (`fastcifar.models.narrow_conv`, `fastcifar.ops.narrow_conv`).
"""

from __future__ import annotations

import functools
import importlib

import torch

from fastcifar.data.augment import MEAN, STD, AugmentDraw
from fastcifar.errors import first_line


@functools.cache
def load() -> tuple[bool, str]:
    """(available, why): import the extension once; never raises."""
    try:
        importlib.import_module("fastcifar._C")
    except (ImportError, OSError) as exc:
        return (
            False,
            f"fastcifar._C did not load ({first_line(exc)})",
        )
    _register()
    return True, "fastcifar._C loaded"


def avx512_kernels_loaded() -> bool:
    """Whether the AVX-512 CPU kernels (max pooling, ReLU-BatchNorm in bf16 and fp32) can
    run: a CPU with AVX-512 (as ATen detects it) and the extension loaded."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and load()[0]


def avx2_kernels_loaded() -> bool:
    """Whether the CPU kernels that AVX2 serves (ReLU-BatchNorm in fp32) can run: a CPU
    with AVX2 or AVX-512 (as ATen detects them) and the extension loaded."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and load()[0]


def amx_tiles_usable() -> bool:
    """Whether `conv3x3_weight_grad` can run: the extension loaded, a CPU with AMX-BF16,
    and Linux granted this process the AMX tile state."""
    return load()[0] and torch.ops.fastcifar.amx_tiles_usable()


def _register() -> None:
    """The operators' fake implementations (for torch.compile), the AMX weight gradient's
    FLOP formula (for `fastcifar profile`) and the pooling op's autograd."""
    from torch.utils.flop_counter import register_flop_formula

    @torch.library.register_fake("fastcifar::augment_batch")
    def _(images, index, dy, dx, flip, cut_y, cut_x, pad, cutout, mean, std, dtype):
        height, width = images.shape[1], images.shape[2]
        nhwc = images.new_empty((index.shape[0], height, width, 3), dtype=dtype)
        return nhwc.permute(0, 3, 1, 2)

    def pooled_like(x):  # a channels-last tensor of x's 2 x 2 pooled shape
        n, c, h, w = x.shape
        return x.new_empty((n, h // 2, w // 2, c)).permute(0, 3, 1, 2)

    @torch.library.register_fake("fastcifar::max_pool2x2")
    def _(x):
        out = pooled_like(x)
        return out, torch.empty_like(out, dtype=torch.uint8)

    @torch.library.register_fake("fastcifar::max_pool2x2_backward")
    def _(grad, where, height, width):
        n, c = grad.shape[:2]
        return grad.new_empty((n, height, width, c)).permute(0, 3, 1, 2)

    @torch.library.register_fake("fastcifar::winograd_conv3x3")
    def _(x, packed_weight, bias):
        n, _, h, w = x.shape
        return x.new_empty((n, h, w, packed_weight.shape[2])).permute(0, 3, 1, 2)

    @torch.library.register_fake("fastcifar::winograd_conv3x3_weight_grad")
    def _(grad, x, tile=2):
        planes = (tile + 2) ** 2
        tiles = x.new_empty((planes, x.shape[1], grad.shape[1]), dtype=torch.float32)
        return tiles, x.new_empty((grad.shape[1],), dtype=torch.float32)

    @torch.library.register_fake("fastcifar::relu_moments")
    def _(x):
        return x.new_empty((2, x.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("fastcifar::relu_grad_moments")
    def _(grad, x):
        return x.new_empty((2, x.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("fastcifar::relu_affine")
    def _(x, scale, shift):
        return torch.empty_like(x, memory_format=torch.channels_last)

    @torch.library.register_fake("fastcifar::relu_affine_backward")
    def _(grad, x, grad_scale, x_scale, offset):
        return torch.empty_like(x, memory_format=torch.channels_last)

    @torch.library.register_fake("fastcifar::relu_affine_max_pool")
    def _(x, scale, shift):
        out = pooled_like(x)
        return out, torch.empty_like(out), torch.empty_like(out, dtype=torch.uint8)

    @torch.library.register_fake("fastcifar::relu_affine_backward_moments")
    def _(grad, x, grad_scale, x_scale, offset):
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        return grad_x, x.new_empty((2, x.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("fastcifar::relu_affine_max_pool_backward")
    def _(grad, where, x, grad_scale, x_scale, offset):
        return torch.empty_like(x, memory_format=torch.channels_last)

    @register_flop_formula(torch.ops.fastcifar.conv3x3_weight_grad)
    def _(grad_shape, x_shape, *_, **__) -> int:
        n, c_in, h, w = x_shape
        return 2 * n * h * w * c_in * grad_shape[1] * 9

    @register_flop_formula(torch.ops.fastcifar.conv3x3_narrow_weight_grad)
    def _(grad_shape, x_shape, *_, **__) -> int:
        n, c_in, h, w = x_shape
        return 2 * n * h * w * c_in * grad_shape[1] * 9

    @torch.library.register_fake("fastcifar::conv3x3_narrow_weight_grad")
    def _(grad, x):
        c_out, c_in = grad.shape[1], x.shape[1]
        return x.new_empty((c_out, c_in, 3, 3)), x.new_empty(c_out)

    @torch.library.register_fake("fastcifar::conv3x3_weight_grad")
    def _(grad, x, windows=False):
        c_out, c_in = grad.shape[1], x.shape[1]
        weight = x.new_empty((c_out, c_in, 3, 3), dtype=torch.float32)
        out = [
            weight.contiguous(memory_format=torch.channels_last),
            x.new_empty(c_out, dtype=torch.float32),
        ]
        return out + [x.new_empty((c_out, 3, 3), dtype=torch.float32)] if windows else out

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.size = inputs[0].shape[2:]

    def backward(ctx, grad, _):
        (where,) = ctx.saved_tensors
        return torch.ops.fastcifar.max_pool2x2_backward(grad, where, *ctx.size)

    torch.library.register_autograd("fastcifar::max_pool2x2", backward, setup_context=setup_context)


def augment_batch(images: torch.Tensor, index: torch.Tensor, d: AugmentDraw, *, pad: int,
                  cutout: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The training batch for rows `index` of uint8 NHWC `images`, NCHW channels-last."""
    return torch.ops.fastcifar.augment_batch(
        images, index, d.dy, d.dx, d.flip, d.cut_y if cutout else None,
        d.cut_x if cutout else None, pad, cutout, list(MEAN), list(STD), dtype,
    )  # fmt: skip

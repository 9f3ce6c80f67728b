"""`nn.MaxPool2d(2)` through the native CPU kernel where it is faster: bf16 channels-last
activations on a CPU with AVX-512 (`fastcifar._C`'s `max_pool2x2`, the same values and
gradients as `F.max_pool2d`). ATen's channels-last pooling vectorises over channels and
is slow when they are few; side by side on the pooling shapes of the architectures here
(`benchmarks/test_pooling.py`), bf16 forward and backward ran 1.2x to 5.5x faster
natively (lenet's 6-channel pool 5.5x; a 4 x 4 one 0.93x), fp32 0.6x to 2.1x, so fp32
stays with ATen."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def native_pooling_fits(x: torch.Tensor) -> bool:
    """Whether the native kernel takes `x`: a CPU bf16 channels-last batch of 2 x 2 pixels
    or more."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class MaxPool2x2(nn.Module):
    """`nn.MaxPool2d(2)`, through `fastcifar._C` where its AVX-512 kernel runs and
    `native_pooling_fits`, else ATen."""

    def __init__(self):
        super().__init__()
        from fastcifar.ops import native

        self.native = native.avx512_kernels_loaded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and native_pooling_fits(x):
            return torch.ops.fastcifar.max_pool2x2(x)[0]
        return F.max_pool2d(x, 2)


def is_plain_2x2(module: nn.Module) -> bool:
    """Whether `module` is an `nn.MaxPool2d` that `MaxPool2x2` computes: kernel and stride
    2, no padding, dilation, ceil mode or indices."""
    if not isinstance(module, nn.MaxPool2d) or module.ceil_mode or module.return_indices:
        return False
    pairs = (module.kernel_size, module.stride, module.padding, module.dilation)
    return [p if isinstance(p, tuple) else (p, p) for p in pairs] == [
        (2, 2),
        (2, 2),
        (0, 0),
        (1, 1),
    ]


def use_native_pooling(model: nn.Module) -> int:
    """Replace every plain `nn.MaxPool2d(2)` in `model` by `MaxPool2x2`, in place (no
    parameter or buffer changes, so checkpoints load either way); returns how many."""
    replaced = 0
    for name, child in model.named_children():
        if is_plain_2x2(child):
            setattr(model, name, MaxPool2x2())
            replaced += 1
        else:
            replaced += use_native_pooling(child)
    return replaced


def native_pooling_available() -> bool:
    """A CPU with AVX-512 (as ATen detects it) and `fastcifar._C` loaded."""
    from fastcifar.ops import native

    return native.avx512_kernels_loaded()

"""`nn.ReLU` followed by `nn.BatchNorm2d` as one layer on the CPU (`fastcifar.ops.relu_bn`):
in training, for channels-last batches with channels in multiples of 16 on a CPU with
AVX-512, the pair becomes two passes forward and two backward over the activations
where ATen makes about five and eight; in evaluation, and for other batches, ATen's ReLU and
BatchNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.ops.relu_bn import relu_batch_norm, relu_bn_fits


class ReluBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` applied to `relu(x)`: the same parameters and buffers (so a
    checkpoint loads either way), the ReLU folded in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.affine and relu_bn_fits(x)):
            return super().forward(F.relu(x))
        momentum = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative moving average, as BatchNorm's
                momentum = 1.0 / float(self.num_batches_tracked)
        running = self.track_running_stats
        return relu_batch_norm(
            x, self.weight, self.bias, self.running_mean if running else None,
            self.running_var if running else None, momentum or 0.0, self.eps,
        )  # fmt: skip


def use_relu_bn(model: nn.Module) -> int:
    """In every `nn.Sequential` of `model`, replace each `nn.ReLU` directly followed by an
    `nn.BatchNorm2d` with an `nn.Identity` and a `ReluBatchNorm2d` holding the same
    parameters and buffers, in place; returns how many pairs."""
    replaced = 0
    for child in model.children():
        replaced += use_relu_bn(child)
    if isinstance(model, nn.Sequential):
        names = list(model._modules)
        for first, second in zip(names, names[1:], strict=False):
            relu, bn = model._modules[first], model._modules[second]
            if type(relu) is nn.ReLU and type(bn) is nn.BatchNorm2d:
                fused = ReluBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                        bn.track_running_stats)  # fmt: skip
                fused.load_state_dict(bn.state_dict())
                fused.to(device=bn.weight.device if bn.affine else None)
                model._modules[first], model._modules[second] = nn.Identity(), fused
                replaced += 1
    return replaced


def relu_bn_available() -> bool:
    """A CPU with AVX-512 (as ATen detects it) and `fastcifar._C` loaded."""
    from fastcifar.ops import native

    return native.avx512_kernels_loaded()


def relu_bn_by_default() -> bool:
    """Whether `--native auto` (or on) swaps the pairs: on CPUs with AMX, where it was
    measured faster (benchmarks/NOTES.md, "The first CPU with AMX"); CPUs with
    AVX512-BF16 alone keep ATen's until measured there."""
    from fastcifar.train.device import cpu_instructions

    return cpu_instructions() == "AMX" and relu_bn_available()

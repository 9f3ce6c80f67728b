"""`nn.ReLU` followed by `nn.BatchNorm2d` as one layer on the CPU (`fastcifar.ops.relu_bn`):
in training, for channels-last batches with channels in multiples of 16 on a CPU with
AVX-512 (bf16 or fp32) or AVX2 (fp32), the pair becomes two passes forward and two backward over the activations
where ATen makes about five and eight; in evaluation without autograd, one pass where
ATen makes two; for other batches, ATen's ReLU and BatchNorm. Where a 2x2 max pool
follows the pair, `ReluBatchNormMaxPool2d` takes it in too: the full-size output and its
gradient are never written. Where a convolution with its weight gradient on AMX follows,
`ReluBatchNormConv2d` applies it too, and its backward takes the BatchNorm's sums from
the convolution's gradients (`fastcifar.ops.relu_bn_conv`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.models.amx_conv import AmxGradConv2d
from fastcifar.models.conv3x3 import same_conv
from fastcifar.models.pooling import MaxPool2x2, is_plain_2x2
from fastcifar.ops.relu_bn import relu_batch_norm, relu_batch_norm_eval, relu_bn_fits
from fastcifar.ops.relu_bn_conv import relu_batch_norm_conv


class ReluBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` applied to `relu(x)`: the same parameters and buffers (so a
    checkpoint loads either way), the ReLU folded in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.affine and relu_bn_fits(x):
            return self.train_forward(x)
        if self.evaluates_in_one_pass(x):
            return self.eval_forward(x)
        return super().forward(F.relu(x))

    def eval_forward(self, x: torch.Tensor, max_pool: bool = False) -> torch.Tensor:
        """Through the kernels: x is a batch `evaluates_in_one_pass` takes."""
        return relu_batch_norm_eval(x, self.weight, self.bias, self.running_mean,
                                    self.running_var, self.eps, max_pool)  # fmt: skip

    def evaluates_in_one_pass(self, x: torch.Tensor) -> bool:
        """Evaluation by the running statistics, nothing to differentiate, a batch the
        kernels take."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and self.affine
            and self.running_mean is not None
            and self.running_var is not None
            and relu_bn_fits(x)
        )

    def train_forward(self, x: torch.Tensor, max_pool: bool = False) -> torch.Tensor:
        """Through the kernels: x is a training batch `relu_bn_fits` takes."""
        return relu_batch_norm(x, self.weight, self.bias, *self.running(), self.eps, max_pool)

    def running(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(running mean, running variance, momentum) for a training batch, counting it as
        BatchNorm does; None for statistics not tracked."""
        momentum = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative moving average, as BatchNorm's
                momentum = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        return (self.running_mean if tracked else None, self.running_var if tracked else None,
                momentum or 0.0)  # fmt: skip


class ReluBatchNormMaxPool2d(ReluBatchNorm2d):
    """`ReluBatchNorm2d` followed by `nn.MaxPool2d(2)`: in training, the second forward pass
    writes the pooled output and the first backward pass reads pooled tensors; in
    evaluation without autograd the one pass pools; the same parameters and buffers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = MaxPool2x2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) >= 2:
            if self.training and self.affine and relu_bn_fits(x):
                return self.train_forward(x, max_pool=True)
            if self.evaluates_in_one_pass(x):
                return self.eval_forward(x, max_pool=True)
        return self.pool(super().forward(x))


class FoldedAmxGradConv2d(AmxGradConv2d):
    """An `AmxGradConv2d` that the `ReluBatchNormConv2d` before it applies: its own forward
    passes its input through; it keeps the parameters in their place (the same state
    dict). `convolve` is the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class ReluBatchNormConv2d(ReluBatchNorm2d):
    """`ReluBatchNorm2d` followed by the convolution `conv` (a `FoldedAmxGradConv2d`, not
    a submodule: it stays in its own place): in training, for bf16 batches, one autograd
    function whose backward needs no pass of its own for the BatchNorm's sums; the same
    parameters and buffers."""

    def fold(self, conv: FoldedAmxGradConv2d) -> ReluBatchNormConv2d:
        self._conv = [conv]  # a list: not registered, so not a submodule
        return self

    @property
    def conv(self) -> FoldedAmxGradConv2d:
        return self._conv[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (
            self.training
            and self.affine
            and relu_bn_fits(x)
            and x.dtype == torch.bfloat16
            and torch.is_grad_enabled()
            and conv.weight.requires_grad
        ):
            return relu_batch_norm_conv(x, self.weight, self.bias, *self.running(), self.eps,
                                        conv.weight, conv.bias)  # fmt: skip
        return conv.convolve(super().forward(x))


def use_relu_bn(model: nn.Module) -> int:
    """In every `nn.Sequential` of `model`, replace each `nn.ReLU` directly followed by an
    `nn.BatchNorm2d` with an `nn.Identity` and a `ReluBatchNorm2d` holding the same
    parameters and buffers, in place; returns how many pairs."""

    def swap(relu: nn.Module, bn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        if type(relu) is nn.ReLU and type(bn) is nn.BatchNorm2d:
            return nn.Identity(), _same_batch_norm(ReluBatchNorm2d, bn)
        return None

    return _replace_pairs(model, swap)


def use_relu_bn_pool(model: nn.Module) -> int:
    """In every `nn.Sequential` of `model`, fold each plain 2x2 max pool that directly
    follows a `ReluBatchNorm2d` into it (a `ReluBatchNormMaxPool2d` with the same parameters
    and buffers, the pool replaced by an `nn.Identity`), in place; returns how many."""

    def swap(bn: nn.Module, pool: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        if type(bn) is ReluBatchNorm2d and (type(pool) is MaxPool2x2 or is_plain_2x2(pool)):
            return _same_batch_norm(ReluBatchNormMaxPool2d, bn), nn.Identity()
        return None

    return _replace_pairs(model, swap)


def use_relu_bn_conv(model: nn.Module) -> int:
    """In every `nn.Sequential` of `model`, fold each `AmxGradConv2d` that directly follows
    a `ReluBatchNorm2d` into it (a `ReluBatchNormConv2d`, the convolution's place taken
    by a `FoldedAmxGradConv2d` with the same parameters), in place; returns how many."""

    def swap(bn: nn.Module, conv: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        if type(bn) is ReluBatchNorm2d and type(conv) is AmxGradConv2d:
            folded = same_conv(conv, FoldedAmxGradConv2d)
            return _same_batch_norm(ReluBatchNormConv2d, bn).fold(folded), folded
        return None

    return _replace_pairs(model, swap)


def _replace_pairs(model: nn.Module, swap) -> int:
    """Replace, in every `nn.Sequential` of `model`, each pair of neighbours for which
    `swap(first, second)` gives a new pair; returns how many."""
    replaced = sum(_replace_pairs(child, swap) for child in model.children())
    if isinstance(model, nn.Sequential):
        names = list(model._modules)
        for first, second in zip(names, names[1:], strict=False):
            pair = swap(model._modules[first], model._modules[second])
            if pair is not None:
                model._modules[first], model._modules[second] = pair
                replaced += 1
    return replaced


def _same_batch_norm(cls: type[nn.BatchNorm2d], bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A `cls` with `bn`'s settings, parameters and buffers, on its device."""
    fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    fused.load_state_dict(bn.state_dict())
    return fused.to(device=bn.weight.device if bn.affine else None)


def relu_bn_available() -> bool:
    """A CPU with AVX-512 or AVX2 (as ATen detects them) and `fastcifar._C` loaded: fp32
    batches on both, bf16 on AVX-512 (`fastcifar.ops.relu_bn.relu_bn_fits`)."""
    from fastcifar.ops import native

    return native.avx2_kernels_loaded()


# The architectures whose fp32 steps the layer (with the pools folded in) made at least
# 1.03x faster in both of the AVX2 rule's runs; CerberusNet's gained 1.064x and 1.027x
AVX2_ARCHS = ("conv5", "conv4_relu_bn", "conv4_leaky", "conv4_leaky_dropout")


def relu_bn_default_archs() -> tuple[str, ...] | None:
    """The architectures whose pairs `--native auto` (or on) swaps on this CPU, where it
    was measured faster (benchmarks/NOTES.md, "The first CPU with AMX", "The
    ReLU-BatchNorm layer on the AVX512-BF16 CPU" and "... on the AVX2 CPU"): None for
    every architecture on CPUs with AMX or AVX512-BF16 (bf16 training), `AVX2_ARCHS` on
    CPUs whose widest instructions are AVX2 (fp32 training), none on others (AVX-512
    without bf16 was never measured)."""
    from fastcifar.train.device import cpu_instructions, native_bf16

    if not relu_bn_available():
        return ()
    if native_bf16(torch.device("cpu")):
        return None
    return AVX2_ARCHS if cpu_instructions() == "AVX2" else ()


def relu_bn_by_default(arch: str) -> bool:
    """Whether `--native auto` (or on) swaps `arch`'s pairs on this CPU."""
    archs = relu_bn_default_archs()
    return archs is None or arch in archs

"""The first layer's weight gradient from fastcifar's AVX2 kernel (`models.narrow_conv`)
against oneDNN's backward-weights, side by side in alternating timed windows (medians of
the per-round ratios): the op alone on the first-layer shapes here, and whole fp32
training steps of every architecture with such a layer, both sides with the fp32
default's other layers (Winograd convolutions, and the ReLU-BatchNorm layer where it is
the default)."""

from __future__ import annotations

import pytest
import torch

from fastcifar.models.narrow_conv import narrow_conv_available, use_narrow_conv
from fastcifar.models.winograd import winograd_available

from .conftest import (
    cpu_default_layers,
    environment,
    fp32_default_convolutions,
    paired_training_steps,
    paired_windows,
)

pytestmark = pytest.mark.skipif(
    not (narrow_conv_available() and winograd_available("none")[0]),
    reason="needs fastcifar._C and a CPU with AVX2 and FMA",
)


@pytest.mark.parametrize("c_out", [32, 64])
def test_first_layer_weight_gradient(benchmark, full, device, c_out):
    """The op against oneDNN's backward-weights (with the bias's gradient), 3 input
    channels at 32 x 32, batch 256 (full) or 8."""
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    batch = 256 if full else 8
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(batch, c_out, 32, 32).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, 3, 3, 3)
    sides = {"aten": "onednn", "native": "narrow"}

    def window(side):
        for _ in range(5 if full else 1):
            if side == "onednn":
                torch.ops.aten.convolution_backward(grad, x, weight, [c_out], [1, 1], [1, 1],
                                                    [1, 1], False, [0, 0], 1,
                                                    [False, True, True])  # fmt: skip
            else:
                torch.ops.fastcifar.conv3x3_narrow_weight_grad(grad, x)

    result = {}
    benchmark.pedantic(lambda: result.update(paired_windows(sides, window, 7 if full else 1)),
                       rounds=1, iterations=1)  # fmt: skip
    benchmark.extra_info.update(kind="narrow_weight_grad", batch_size=batch, c_in=3, c_out=c_out,
                                **result, **environment(device))  # fmt: skip
    assert result["speedup"] > 0


@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4", "conv4", "conv4_relu",
                                  "conv4_relu_bn", "conv4_leaky", "conv4_leaky_dropout"])  # fmt: skip
def test_fp32_training_step_with_the_narrow_weight_gradient(benchmark, full, device, arch):
    """The speed half of the first-layer kernel's rule on an AVX2 CPU (benchmarks/NOTES.md)."""

    def fp32_default_layers(model) -> None:
        cpu_default_layers(model, arch)
        fp32_default_convolutions(model)

    result = paired_training_steps(benchmark, arch, full, device, kind="narrow_conv_fp32_step",
                                   swap=use_narrow_conv, prepare=fp32_default_layers,
                                   images=1024, rounds=7, bf16=False)  # fmt: skip
    assert result["speedup"] > 0

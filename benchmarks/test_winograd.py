"""Winograd convolutions on the CPU against oneDNN's, side by side, in alternating timed
windows (medians of the per-round ratios): each 3x3 layer shape that Winograd takes in
CerberusNet, conv5 and wide4 alone, forward and backward; whole bf16 training steps
with Winograd's weight gradient (`use_winograd_weight_grad`) against oneDNN's, both sides
with Winograd's forward and input gradient and the CPU's other default native layers, so
only the weight gradients differ (or only the input gradients: F(4x4) against F(2x2));
and whole fp32 training steps with Winograd throughout
against oneDNN's direct convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcifar.models.winograd import (
    WinogradConv2d,
    use_winograd,
    use_winograd_input_grad_tile,
    use_winograd_weight_grad,
    winograd_available,
)

from .conftest import (
    cpu_default_layers,
    environment,
    paired_training_steps,
    paired_windows,
    winograd_in_full,
)

bf16_only = pytest.mark.skipif(
    not winograd_available()[0], reason="needs fastcifar._C and a CPU with AVX512-BF16 (no AMX)"
)
fp32_winograd = pytest.mark.skipif(
    not winograd_available("none")[0], reason="needs fastcifar._C and a CPU with AVX2 and FMA"
)


# (arch, channels in, channels out, size) of each distinct 3x3 layer Winograd takes there
LAYERS = [("cerberus", 64, 64, 32), ("cerberus", 64, 128, 16), ("cerberus", 128, 128, 16),
          ("cerberus", 128, 256, 8), ("cerberus", 256, 256, 8), ("conv5", 32, 64, 32),
          ("wide4", 48, 96, 32), ("wide4", 96, 192, 16), ("wide4", 192, 256, 16)]  # fmt: skip


def bf16_channels_last(batch: int, channels: int, size: int) -> torch.Tensor:
    x = torch.randn(batch, channels, size, size).bfloat16()
    return x.contiguous(memory_format=torch.channels_last)


@bf16_only
@pytest.mark.parametrize(("arch", "c_in", "c_out", "size"), LAYERS)
def test_layer_forward_backward(benchmark, full, device, arch, c_in, c_out, size):
    """One layer under bf16 autocast, channels-last, at batch 256: forward, then the input's
    and the weight's gradients; oneDNN's `nn.Conv2d` ("aten") against `WinogradConv2d` with
    Winograd's weight gradient ("native"), the same parameters."""
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    batch = 256 if full else 4
    conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
    winograd = WinogradConv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
    winograd.load_state_dict(conv.state_dict())
    winograd.winograd_weight_grad = True
    x = bf16_channels_last(batch, c_in, size).requires_grad_()
    grad = bf16_channels_last(batch, c_out, size)

    def window(layer, calls=10 if full else 1):
        for _ in range(calls):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            out.backward(grad)

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        close = torch.allclose(winograd(x).float(), conv(x).float(), rtol=0.05, atol=0.05)
    assert close, "the Winograd layer's output is not the convolution's"
    result = {}
    benchmark.pedantic(lambda: result.update(paired_windows({"aten": conv, "native": winograd},
                                                             window, 7 if full else 1)),
                       rounds=1, iterations=1)  # fmt: skip
    benchmark.extra_info.update(kind="winograd_layer", arch=arch, batch_size=batch, c_in=c_in,
                                c_out=c_out, size=size, **result, **environment(device))  # fmt: skip
    assert result["speedup"] > 0


def winograd_forward(model, arch: str) -> None:
    cpu_default_layers(model, arch)
    use_winograd(model)


@bf16_only
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4", "conv4_relu_bn"])
def test_training_step_with_the_winograd_weight_gradient(benchmark, full, device, arch):
    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_weight_grad_step",
                                   swap=use_winograd_weight_grad,
                                   prepare=lambda model: winograd_forward(model, arch),
                                   images=2048, rounds=7)  # fmt: skip
    assert result["speedup"] > 0


def winograd_with_its_weight_gradient(model, arch: str) -> None:
    winograd_forward(model, arch)
    use_winograd_weight_grad(model)


@bf16_only
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4"])
def test_training_step_with_the_f4_weight_gradient(benchmark, full, device, arch):
    """F(4x4, 3x3)'s weight gradient ("native") against F(2x2, 3x3)'s ("aten"), both sides
    with Winograd's forward: the speed half of its rule (benchmarks/NOTES.md)."""
    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_f4_weight_grad_step",
                                   swap=lambda model: use_winograd_weight_grad(model, tile=4),
                                   prepare=lambda model: winograd_with_its_weight_gradient(model, arch),
                                   images=2048,
                                   rounds=7)  # fmt: skip
    assert result["speedup"] > 0


@bf16_only
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4"])
def test_training_step_with_the_f4_input_gradient(benchmark, full, device, arch):
    """F(4x4, 3x3)'s input gradient ("native") against F(2x2, 3x3)'s ("aten"), both sides
    with Winograd's forward and F(2x2)'s weight gradient (the default): the speed half of
    its rule (benchmarks/NOTES.md)."""
    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_f4_input_grad_step",
                                   swap=lambda model: use_winograd_input_grad_tile(model, 4),
                                   prepare=lambda model: winograd_with_its_weight_gradient(model, arch),
                                   images=2048,
                                   rounds=7)  # fmt: skip
    assert result["speedup"] > 0


def f4_gradients(model) -> int:
    use_winograd_weight_grad(model, tile=4)
    return use_winograd_input_grad_tile(model, 4)


@bf16_only
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4"])
def test_training_step_with_both_f4_gradients(benchmark, full, device, arch):
    """F(4x4, 3x3) for both gradients ("native") against the default's F(2x2, 3x3) for
    both ("aten"), both sides with Winograd's forward."""
    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_f4_grads_step",
                                   swap=f4_gradients,
                                   prepare=lambda model: winograd_with_its_weight_gradient(model, arch),
                                   images=2048, rounds=7)  # fmt: skip
    assert result["speedup"] > 0


@fp32_winograd
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4", "conv4_relu_bn"])
def test_fp32_training_step_with_winograd(benchmark, full, device, arch):
    """fp32 training steps (no autocast) with Winograd's forward, input and weight
    gradients ("native") against oneDNN's direct convolutions ("aten"), both sides with
    the CPU's other default native layers: the speed half of the fp32 default's rule on
    an AVX2 CPU (benchmarks/NOTES.md)."""
    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_fp32_step",
                                   swap=winograd_in_full,
                                   prepare=lambda model: cpu_default_layers(model, arch),
                                   images=1024, rounds=7, bf16=False)  # fmt: skip
    assert result["speedup"] > 0


@fp32_winograd
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4", "conv4_relu_bn"])
def test_fp32_training_step_with_the_f4_forward(benchmark, full, device, arch):
    """fp32 training steps with Winograd throughout, the forward and input gradient as
    F(4x4, 3x3) ("native") against F(2x2, 3x3) ("aten"): the speed half of the F(4x4)
    rule on an AVX2 CPU (benchmarks/NOTES.md)."""

    def f2(model) -> None:
        cpu_default_layers(model, arch)
        winograd_in_full(model, fp32_tile=2)

    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_fp32_f4_step",
                                   swap=lambda model: winograd_in_full(model, fp32_tile=4),
                                   prepare=f2, images=1024, rounds=7, bf16=False)  # fmt: skip
    assert result["speedup"] > 0


@fp32_winograd
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4", "conv4_relu_bn"])
def test_fp32_training_step_with_the_f4_weight_gradient(benchmark, full, device, arch):
    """fp32 training steps with Winograd throughout, the forward and input gradient as
    F(4x4, 3x3) on both sides, the weight gradient as F(4x4, 3x3) ("native") against F(2x2,
    3x3) ("aten"): the speed half of its fp32 rule on an AVX2 CPU (benchmarks/NOTES.md)."""

    def f2_grad(model) -> None:
        cpu_default_layers(model, arch)
        winograd_in_full(model, fp32_tile=4, grad_tile=2)

    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_fp32_f4_grad_step",
                                   swap=lambda model: winograd_in_full(model, 4, grad_tile=4),
                                   prepare=f2_grad, images=1024, rounds=7, bf16=False)  # fmt: skip
    assert result["speedup"] > 0

"""Winograd's weight gradient (`fastcifar.models.winograd.use_winograd_weight_grad`)
against oneDNN's, side by side: whole bf16 training steps in alternating timed windows,
both sides with Winograd's forward and input gradient and the CPU's other default native
layers, so only the weight gradients differ; medians of the per-round ratios."""

from __future__ import annotations

import pytest

from fastcifar.models.winograd import use_winograd, use_winograd_weight_grad, winograd_available

from .conftest import cpu_default_layers, paired_training_steps

pytestmark = pytest.mark.skipif(
    not winograd_available()[0], reason="needs fastcifar._C and a CPU with AVX512-BF16 (no AMX)"
)


def winograd_forward(model) -> None:
    cpu_default_layers(model)
    use_winograd(model)


@pytest.mark.parametrize("arch", ["cerberus", "conv5", "wide4", "conv4_relu_bn"])
def test_training_step_with_the_winograd_weight_gradient(benchmark, full, device, arch):
    result = paired_training_steps(benchmark, arch, full, device, kind="winograd_weight_grad_step",
                                   swap=use_winograd_weight_grad, prepare=winograd_forward,
                                   images=2048, rounds=7)  # fmt: skip
    assert result["speedup"] > 0

"""3x3 convolutions with the AMX weight gradient (fastcifar.models.amx_conv) against
oneDNN's convolution backward, side by side: whole bf16 training steps in alternating
timed windows, both sides with the CPU's other native layers (pooling, ReLU-BatchNorm)
where they are the default, so only the convolutions differ; medians of the per-round
ratios."""

from __future__ import annotations

import pytest

from fastcifar.models.amx_conv import amx_conv_available, use_amx_conv

from .conftest import cpu_default_layers, paired_training_steps

pytestmark = pytest.mark.skipif(
    not amx_conv_available(), reason="needs fastcifar._C and a CPU with AMX-BF16"
)


@pytest.mark.parametrize("arch", ["cerberus", "conv5", "conv4_relu_bn", "conv4_leaky", "wide4"])
def test_training_step_with_the_amx_weight_gradient(benchmark, full, device, arch):
    result = paired_training_steps(benchmark, arch, full, device, kind="amx_conv_step",
                                   swap=use_amx_conv, prepare=lambda model: cpu_default_layers(model, arch),
                                   images=2048,
                                   rounds=7)  # fmt: skip
    assert result["speedup"] > 0

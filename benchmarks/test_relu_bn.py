"""The ReLU-BatchNorm layer (fastcifar.models.relu_bn) against ATen's ReLU and BatchNorm,
side by side: whole bf16 training steps of the models with ReLU-BatchNorm pairs, in
alternating timed windows (both sides with native pooling where it is available, so only
the pairs differ); medians of the per-round ratios."""

from __future__ import annotations

import pytest

from fastcifar.models.pooling import native_pooling_available, use_native_pooling
from fastcifar.models.relu_bn import relu_bn_available, use_relu_bn

from .conftest import paired_training_steps

pytestmark = pytest.mark.skipif(
    not relu_bn_available(), reason="needs fastcifar._C and a CPU with AVX-512"
)


@pytest.mark.parametrize("arch", ["cerberus", "conv5", "conv4_relu_bn"])
def test_training_step_with_relu_batch_norm(benchmark, full, device, arch):
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    prepare = use_native_pooling if native_pooling_available() else None
    result = paired_training_steps(benchmark, arch, full, device, kind="relu_bn_step",
                                   swap=use_relu_bn, prepare=prepare, images=2048, rounds=7)  # fmt: skip
    assert result["speedup"] > 0

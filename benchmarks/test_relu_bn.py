"""The ReLU-BatchNorm layer (fastcifar.models.relu_bn) against ATen's ReLU and BatchNorm,
side by side: whole bf16 training steps of the models with ReLU-BatchNorm pairs, in
alternating timed windows (both sides with native pooling where it is available, so only
the pairs differ); the layer with a following 2x2 max pool folded in, against the same
layer and the native pool apart; and the layer with the AMX convolution after it folded in
(its backward's sums from the convolution's gradients), against the two apart; the layer
and the folded pools together against ATen's pairs (what the default swaps in); and
evaluation (no autograd) of the models with the layers in their one pass, the pools
folded in, against ATen's ReLU and BatchNorm and the native pool; and the same default
swap in fp32 steps, training and evaluation, with the fp32 default's Winograd
convolutions on both sides (the measure for CPUs that train in fp32). Medians of the
per-round ratios."""

from __future__ import annotations

import pytest

from fastcifar.models.amx_conv import amx_conv_available, use_amx_conv
from fastcifar.models.pooling import native_pooling_available, use_native_pooling
from fastcifar.models.relu_bn import (
    relu_bn_available,
    use_relu_bn,
    use_relu_bn_conv,
    use_relu_bn_pool,
)
from fastcifar.models.winograd import winograd_available
from fastcifar.ops.relu_bn import kernels_take_bf16

from .conftest import fp32_default_convolutions, paired_evaluation_steps, paired_training_steps

pytestmark = pytest.mark.skipif(
    not relu_bn_available(), reason="needs fastcifar._C and a CPU with AVX2 or AVX-512"
)
bf16_kernels = pytest.mark.skipif(not kernels_take_bf16(), reason="bf16 kernels need AVX-512")
fp32_winograd = pytest.mark.skipif(
    not winograd_available("none")[0], reason="needs fastcifar._C and a CPU with AVX2 and FMA"
)
# the architectures with ReLU-BatchNorm pairs
PAIRED = ["cerberus", "conv5", "conv4_relu_bn", "conv4_leaky", "conv4_leaky_dropout"]

# both sides' pools native where they can be, so that only the ReLU-BatchNorm pairs differ
POOLS_ONLY = use_native_pooling if native_pooling_available() else None


@bf16_kernels
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "conv4_relu_bn"])
def test_training_step_with_relu_batch_norm(benchmark, full, device, arch):
    result = paired_training_steps(benchmark, arch, full, device, kind="relu_bn_step",
                                   swap=use_relu_bn, prepare=POOLS_ONLY, images=2048, rounds=7)  # fmt: skip
    assert result["speedup"] > 0


def cpu_layers(model) -> None:
    """The CPU's native layers (pooling, the ReLU-BatchNorm pairs, the AMX weight gradient
    where available), the pools not folded."""
    if native_pooling_available():
        use_native_pooling(model)
    use_relu_bn(model)
    if amx_conv_available():
        use_amx_conv(model)


@bf16_kernels
@pytest.mark.parametrize("arch", ["cerberus", "conv5", "conv4_relu_bn", "conv4_leaky"])
def test_training_step_with_the_max_pool_folded_in(benchmark, full, device, arch):
    result = paired_training_steps(benchmark, arch, full, device, kind="relu_bn_pool_step",
                                   swap=use_relu_bn_pool, prepare=cpu_layers, images=2048,
                                   rounds=7)  # fmt: skip
    assert result["speedup"] > 0


def amx_default_layers(model) -> None:
    """`cpu_layers` with the pools folded, as the AMX CPU's default has them."""
    cpu_layers(model)
    use_relu_bn_pool(model)


@bf16_kernels
@pytest.mark.parametrize("arch", ["cerberus", "conv5"])
def test_training_step_with_the_next_convolution_folded_in(benchmark, full, device, arch):
    if not amx_conv_available():
        pytest.skip("a CPU kernel with AMX")
    result = paired_training_steps(benchmark, arch, full, device, kind="relu_bn_conv_step",
                                   swap=use_relu_bn_conv, prepare=amx_default_layers,
                                   images=2048, rounds=7)  # fmt: skip
    assert result["speedup"] > 0


@bf16_kernels
@pytest.mark.parametrize("arch", PAIRED)
def test_training_step_with_the_default_layers(benchmark, full, device, arch):
    """What the CPU default swaps in (the layer, the pools after it folded in) against
    ATen's pairs, without the AMX weight gradient: the measure for CPUs without AMX."""
    result = paired_training_steps(benchmark, arch, full, device, kind="relu_bn_default_step",
                                   swap=swap_relu_bn_and_pools, prepare=POOLS_ONLY, images=2048,
                                   rounds=7)  # fmt: skip
    assert result["speedup"] > 0


@bf16_kernels
@pytest.mark.parametrize("arch", PAIRED)
def test_evaluation_in_one_pass(benchmark, full, device, arch):
    result = paired_evaluation_steps(benchmark, arch, full, device, kind="relu_bn_eval",
                                     swap=swap_relu_bn_and_pools, prepare=POOLS_ONLY,
                                     images=5000, rounds=7)  # fmt: skip
    assert result["speedup"] > 0


@fp32_winograd
@pytest.mark.parametrize("arch", PAIRED)
def test_fp32_training_step_with_the_default_layers(benchmark, full, device, arch):
    """fp32 steps (no autocast): the layer with the pools folded in against ATen's pairs
    and pools, both sides with the fp32 default's Winograd convolutions: the speed half of
    the ReLU-BatchNorm rule on an AVX2 CPU (benchmarks/NOTES.md)."""
    result = paired_training_steps(benchmark, arch, full, device, kind="relu_bn_fp32_step",
                                   swap=swap_relu_bn_and_pools, prepare=fp32_default_convolutions,
                                   images=1024, rounds=7, bf16=False)  # fmt: skip
    assert result["speedup"] > 0


@fp32_winograd
@pytest.mark.parametrize("arch", PAIRED)
def test_fp32_evaluation_in_one_pass(benchmark, full, device, arch):
    result = paired_evaluation_steps(benchmark, arch, full, device, kind="relu_bn_fp32_eval",
                                     swap=swap_relu_bn_and_pools,
                                     prepare=fp32_default_convolutions, images=3000, rounds=7,
                                     bf16=False)  # fmt: skip
    assert result["speedup"] > 0


def swap_relu_bn_and_pools(model) -> int:
    """The ReLU-BatchNorm pairs as one layer each, the pools after them folded in: how
    many pairs."""
    pairs = use_relu_bn(model)
    use_relu_bn_pool(model)
    return pairs

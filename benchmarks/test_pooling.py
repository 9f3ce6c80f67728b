"""Native CPU max pooling (fastcifar._C's max_pool2x2) against ATen's F.max_pool2d, side by
side: each pooling shape of the architectures alone (forward and backward, bf16 and
fp32), and whole bf16 training steps of the models that pool most, in alternating timed
windows; medians of the per-round ratios."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcifar.models.pooling import MaxPool2x2, native_pooling_available, use_native_pooling

from .conftest import environment, paired_training_steps, paired_windows

pytestmark = pytest.mark.skipif(
    not native_pooling_available(), reason="needs fastcifar._C and a CPU with AVX-512"
)

# (arch, batch, channels, size) of every pool in the registered architectures at their
# CPU recipes' batch sizes (lenet and conv3 128, the others 256), first pools first
SHAPES = [("lenet", 128, 6, 28), ("lenet", 128, 16, 10), ("conv3", 128, 32, 30),
          ("conv3", 128, 64, 13), ("conv3", 128, 64, 4), ("conv4", 256, 32, 32),
          ("conv4", 256, 64, 16), ("conv4", 256, 128, 8), ("conv4", 256, 256, 4),
          ("cerberus", 256, 64, 32), ("cerberus", 256, 128, 16), ("cerberus", 256, 256, 8),
          ("sinha14", 256, 28, 32), ("sinha14", 256, 28, 16), ("sinha14", 256, 28, 8),
          ("wide4", 256, 96, 32), ("wide4", 256, 256, 16)]  # fmt: skip


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize(("arch", "batch", "channels", "size"), SHAPES)
def test_pool_forward_backward(benchmark, full, device, arch, batch, channels, size, dtype):
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    batch = batch if full else 4
    x = torch.randn(batch, channels, size, size).to(
        torch.bfloat16 if dtype == "bf16" else torch.float32
    )
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    pool = MaxPool2x2()
    sides = {"aten": lambda t: F.max_pool2d(t, 2),
             "native": lambda t: torch.ops.fastcifar.max_pool2x2(t)[0]}  # fmt: skip
    grad = torch.ones_like(F.max_pool2d(x.detach(), 2))

    def window(side, calls=20 if full else 1):
        for _ in range(calls):
            x.grad = None
            side(x).backward(grad)

    assert torch.equal(pool(x.detach()), F.max_pool2d(x.detach(), 2))
    result = {}
    benchmark.pedantic(lambda: result.update(paired_windows(sides, window, 7 if full else 1)), rounds=1,
                       iterations=1)  # fmt: skip
    benchmark.extra_info.update(kind="pooling", arch=arch, batch_size=batch, channels=channels,
                                size=size, dtype=dtype, **result, **environment(device))  # fmt: skip
    assert result["speedup"] > 0


@pytest.mark.parametrize("arch", ["lenet", "conv3", "conv4_leaky", "conv5"])
def test_training_step_with_native_pooling(benchmark, full, device, arch):
    """bf16 autocast, channels-last, SGD, random batches of the recipe's size: the model
    with native pooling against the same model with ATen's (the loader left out)."""
    result = paired_training_steps(benchmark, arch, full, device, kind="pooling_step",
                                   swap=use_native_pooling, images=4096, rounds=9)  # fmt: skip
    assert result["speedup"] > 0

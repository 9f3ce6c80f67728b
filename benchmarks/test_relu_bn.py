"""The ReLU-BatchNorm layer (fastcifar.models.relu_bn) against ATen's ReLU and BatchNorm,
side by side: whole bf16 training steps of the models with ReLU-BatchNorm pairs, in
alternating timed windows (both sides with native pooling where it is available, so only
the pairs differ); medians of the per-round ratios."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcifar.models.pooling import native_pooling_available, use_native_pooling
from fastcifar.models.relu_bn import relu_bn_available, use_relu_bn

from .conftest import environment, paired_windows

pytestmark = pytest.mark.skipif(
    not relu_bn_available(), reason="needs fastcifar._C and a CPU with AVX-512"
)


@pytest.mark.parametrize("arch", ["cerberus", "conv5", "conv4_relu_bn"])
def test_training_step_with_relu_batch_norm(benchmark, full, device, arch):
    """bf16 autocast, channels-last, SGD, random batches of the recipe's size (the loader
    left out)."""
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    from fastcifar.models import create_model
    from fastcifar.recipes import recipe

    batch = recipe(arch, "cpu").get("batch_size", 256) if full else 8
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    sides = {}
    for name in ("aten", "native"):
        torch.manual_seed(0)
        model = create_model(arch).to(memory_format=torch.channels_last)
        if native_pooling_available():
            use_native_pooling(model)
        if name == "native":
            assert use_relu_bn(model) > 0
        sides[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    steps = max(3, 2048 // batch) if full else 1

    def window(side):
        model, optimizer = side
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    result = {}
    benchmark.pedantic(lambda: result.update(paired_windows(sides, window, 7 if full else 1)),
                       rounds=1, iterations=1)  # fmt: skip
    per_step = {k: v / steps for k, v in result.items() if k.endswith("_ms")}
    benchmark.extra_info.update(kind="relu_bn_step", arch=arch, batch_size=batch, steps=steps,
                                speedup=result["speedup"], rounds=result["rounds"],
                                aten_images_per_sec=batch * 1e3 / per_step["aten_ms"],
                                native_images_per_sec=batch * 1e3 / per_step["native_ms"],
                                **environment(device))  # fmt: skip
    assert result["speedup"] > 0

"""Loader-only throughput: the tutorial DataLoader with per-image transforms against the
device-resident tensor loader (its gather, and the native fused op) and the DALI loader,
in fp32 and bf16."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from fastcifar.baseline import tutorial_loader

from .conftest import environment, training_loader


def _rate(batches, count: int, batch_size: int, device) -> float:
    start = time.perf_counter()
    for x, _ in itertools.islice(batches, count):
        x.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: end of the timed window
    return count * batch_size / (time.perf_counter() - start)


@pytest.mark.parametrize(
    "loader",
    [
        "tutorial",
        "tensor_fp32",
        "tensor_bf16",
        "native_fp32",
        "native_bf16",
        "dali_fp32",
        "dali_bf16",
        "dali_4096_fp32",
        "dali_4096_bf16",
    ],
)
def test_loader_throughput(benchmark, loader, full, device, train_arrays):
    images, labels = train_arrays
    batch = 256
    count = (len(labels) // batch) if full else 4
    if loader == "tutorial":
        make = lambda: iter(tutorial_loader(images, labels, batch))  # noqa: E731
    else:
        kind, precision = loader.rsplit("_", 1)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        made, why = training_loader(kind, images, labels, batch, dtype, device)
        if made is None:
            pytest.skip(why)
        make = lambda: iter(made)  # noqa: E731
    rates = []
    benchmark.pedantic(lambda: rates.append(_rate(make(), count, batch, device)), rounds=3 if full else 1,
                       iterations=1)  # fmt: skip
    rate = sorted(rates)[len(rates) // 2]
    benchmark.extra_info.update(loader=loader, kind="loader", batch_size=batch, images_per_sec=rate,
                                **environment(device))  # fmt: skip
    assert rate > 0

"""Loader-only throughput: the tutorial DataLoader with per-image transforms against the
device-resident tensor loader (its gather, and the native fused op) and the DALI loader,
in fp32 and bf16."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from fastcifar.baseline import tutorial_loader
from fastcifar.data.loader import TensorLoader

from .conftest import environment


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
    ],
)
def test_loader_throughput(benchmark, loader, full, device, train_arrays):
    images, labels = train_arrays
    batch = 256
    count = (len(labels) // batch) if full else 4
    if loader == "tutorial":
        make = lambda: iter(tutorial_loader(images, labels, batch))  # noqa: E731
    elif loader.startswith("dali"):
        pytest.importorskip("nvidia.dali")
        from fastcifar.data.dali_loader import DaliLoader

        dtype = torch.bfloat16 if loader.endswith("bf16") else torch.float32
        dl = DaliLoader(images, labels, batch, train=True, dtype=dtype, device=device)
        make = lambda: iter(dl)  # noqa: E731
    else:
        native = loader.startswith("native")
        if native:
            from fastcifar.ops.native import load

            available, why = load()
            if not available:
                pytest.skip(why)
        dtype = torch.bfloat16 if loader.endswith("bf16") else torch.float32
        tl = TensorLoader(torch.from_numpy(np.array(images)).to(device),
                          torch.from_numpy(np.array(labels)).to(device), batch, train=True, dtype=dtype,
                          native=native)  # fmt: skip
        make = lambda: iter(tl)  # noqa: E731
    rates = []
    benchmark.pedantic(lambda: rates.append(_rate(make(), count, batch, device)), rounds=3 if full else 1,
                       iterations=1)  # fmt: skip
    rate = sorted(rates)[len(rates) // 2]
    benchmark.extra_info.update(loader=loader, kind="loader", batch_size=batch, images_per_sec=rate,
                                **environment(device))  # fmt: skip
    assert rate > 0

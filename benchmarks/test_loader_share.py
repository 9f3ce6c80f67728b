"""The share of a training step each loader costs: fastcifar's default training steps for
`lenet` and `cerberus`, fed by each loader, against the same steps fed from batches
prepared in advance (the loader's cost taken away).

share = 1 - (images/s with the loader) / (images/s from prepared batches), both measured
in the same session. Goals: on the CPU, `lenet` with the native op and prefetching at or
above 90% of the prepared rate; on a GPU, every loader under 5% of a `cerberus` step.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from fastcifar.bench import build_pipeline
from fastcifar.data.loader import TensorLoader
from fastcifar.data.prefetch import Prefetched
from fastcifar.train.device import input_dtype

from .conftest import environment

LOADERS = ["prepared", "tensor", "tensor_prefetch", "native", "native_prefetch", "dali"]


@pytest.fixture(scope="session")
def prepared_rates() -> dict:
    """Images/s from prepared batches per (arch, batch size), filled as they run."""
    return {}


def _loader(kind: str, images, labels, batch: int, dtype, device):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
        from fastcifar.data.dali_loader import DaliLoader

        return DaliLoader(images, labels, batch, train=True, dtype=dtype, device=device)
    native = kind.startswith("native")
    if native:
        from fastcifar.ops.native import load

        available, why = load()
        if not available:
            pytest.skip(why)
    loader = TensorLoader(torch.from_numpy(np.array(images)).to(device),
                          torch.from_numpy(np.array(labels)).to(device), batch, train=True,
                          dtype=dtype, native=native)  # fmt: skip
    return Prefetched(loader) if kind.endswith("prefetch") else loader


def _batches(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _rate(p, batches, steps: int) -> float:
    if p.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: earlier work stays out of the window
    start = time.perf_counter()
    for _ in range(steps):
        p.step(*next(batches))
    if p.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: end of the timed window
    return steps * p.cfg.batch_size / (time.perf_counter() - start)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("arch", ["lenet", "cerberus"])
def test_loader_share_of_step(benchmark, arch, loader, full, device, train_arrays, prepared_rates):
    images, labels = train_arrays
    batch = None if full else 32
    p = build_pipeline(arch, "default", images, labels, batch, device)
    dtype = input_dtype(p.cfg.amp)
    if loader == "prepared":
        made = list(itertools.islice(_batches(_loader("tensor", images, labels, p.cfg.batch_size,
                                                      dtype, device)), 8))  # fmt: skip
        batches = itertools.cycle([(x.clone(), y.clone()) for x, y in made])
    else:
        batches = _batches(_loader(loader, images, labels, p.cfg.batch_size, dtype, device))
    steps = (40 if arch == "lenet" else 6) if full else 3
    _rate(p, batches, 2)  # warm-up
    rates = []
    benchmark.pedantic(lambda: rates.append(_rate(p, batches, steps)), rounds=5 if full else 1,
                       iterations=1)  # fmt: skip
    rate = sorted(rates)[len(rates) // 2]
    key = (arch, p.cfg.batch_size)
    if loader == "prepared":
        prepared_rates[key] = rate
    share = 1 - rate / prepared_rates[key] if key in prepared_rates else None
    benchmark.extra_info.update(arch=arch, loader=loader, kind="loader_share",
                                batch_size=p.cfg.batch_size, images_per_sec=rate,
                                share_of_step=share, **environment(device))  # fmt: skip
    assert rate > 0

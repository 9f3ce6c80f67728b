"""The share of a training step each loader costs: fastcifar's default training steps for
`lenet` and `cerberus`, fed by each loader, against the same steps fed from batches
prepared in advance (the loader's cost taken away).

All loaders of one arch run in one test, in alternating timed windows, so that machine
noise hits them alike; share = 1 - (median over windows of the per-window ratio of the
loader's images/s to the prepared batches' images/s). Goals: on the CPU, `lenet` with the
native op and prefetching at 90% or more of the prepared rate; on a GPU, every loader
under 5% of a `cerberus` step.
"""

from __future__ import annotations

import itertools
import statistics

import pytest

from fastcifar.bench import build_pipeline, endless, time_steps
from fastcifar.train.device import input_dtype

from .conftest import environment, training_loader

# dali_4096: the DALI pipeline making 16 batches of 256 a run, its host cost a run shared
LOADERS = ("tensor", "tensor_prefetch", "native", "native_prefetch", "dali", "dali_4096")


@pytest.mark.parametrize("arch", ["lenet", "cerberus"])
def test_loader_share_of_step(benchmark, arch, full, device, train_arrays):
    images, labels = train_arrays
    p = build_pipeline(arch, "default", images, labels, None if full else 32, device)
    dtype, batch = input_dtype(p.cfg.amp), p.cfg.batch_size
    loaders = {k: training_loader(k, images, labels, batch, dtype, device)[0] for k in LOADERS}
    sources = {k: endless(loader) for k, loader in loaders.items() if loader is not None}
    made = endless(training_loader("tensor", images, labels, batch, dtype, device)[0])
    prepared = [(x.clone(), y.clone()) for x, y in itertools.islice(made, 32)]
    sources = {"prepared": itertools.cycle(prepared), **sources}
    if not full:
        steps = 2
    elif device.type == "cuda":  # steps of milliseconds: a short window would time its syncs
        steps = 100
    else:
        steps = 60 if arch == "lenet" else 4
    windows = 9 if full else 1
    for batches in sources.values():
        time_steps(p, 2, batches)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in sources}

    def run():
        for name, batches in sources.items():
            rates[name].append(time_steps(p, steps, batches))

    benchmark.pedantic(lambda: [run() for _ in range(windows)], rounds=1, iterations=1)
    result = {}
    for name in sources:
        ratios = [r / base for r, base in zip(rates[name], rates["prepared"], strict=True)]
        result[name] = {"images_per_sec": statistics.median(rates[name]),
                        "share_of_step": 1 - statistics.median(ratios)}  # fmt: skip
    benchmark.extra_info.update(arch=arch, kind="loader_share", batch_size=batch, steps=steps,
                                windows=windows, loaders=result, **environment(device))  # fmt: skip
    assert all(r["images_per_sec"] > 0 for r in result.values())

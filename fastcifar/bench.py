"""Side-by-side training throughput: fastcifar's pipeline against the tutorial baseline.

Both run on the same data, model, batch size and optimiser, in one process, in
alternating windows so that machine noise hits both alike. Each window times `steps`
training steps, data loading included, after a warm-up; results are medians over windows.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fastcifar.baseline import tutorial_loader, tutorial_step
from fastcifar.config import TrainConfig
from fastcifar.data.dataset import resolve_arrays
from fastcifar.data.loader import TensorLoader
from fastcifar.recipes import recipe
from fastcifar.train.device import input_dtype, resolve_device
from fastcifar.train.engine import build_model, train_step
from fastcifar.train.optim import build_optimizer


@dataclass
class ThroughputResult:
    arch: str
    batch_size: int
    amp: str
    baseline_images_per_sec: float  # median over windows
    fastcifar_images_per_sec: float
    speedup: float  # median of the per-window ratios
    windows: int
    steps_per_window: int
    device: str
    torch: str


def _cycle(make_iter):
    """Batches forever: a new epoch's iterator whenever one runs out."""
    for epoch in itertools.count():
        yield from make_iter(epoch)


def _window(step, batches, steps: int, batch_size: int, device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: end of the timed window
    return steps * batch_size / (time.perf_counter() - start)


def compare_throughput(
    arch: str,
    data: str | None = None,
    batch_size: int | None = None,
    steps: int = 20,
    windows: int = 3,
    warmup: int = 3,
    workers: int = 0,
) -> ThroughputResult:
    device = resolve_device("auto")
    cfg = TrainConfig(**{**recipe(arch, device.type), "arch": arch, "track": False})
    if batch_size:
        cfg = cfg.replace(batch_size=batch_size)
    arrays, _ = resolve_arrays(data, download=False, log=lambda _: None)
    images, labels = arrays.train_images, arrays.train_labels

    # fastcifar: device-resident data, default recipe (AMP, channels-last) for the device
    torch.manual_seed(0)
    model = build_model(cfg, device)
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg)
    loader = TensorLoader(
        torch.from_numpy(np.array(images)).to(device), torch.from_numpy(np.array(labels)).to(device),
        cfg.batch_size,
        train=True, dtype=input_dtype(cfg.amp),
    )  # fmt: skip

    def ours(x, y):
        train_step(step_model, x, y, optimizer, None, cfg, device)

    ours_batches = _cycle(lambda epoch: (loader.set_epoch(epoch), iter(loader))[1])

    # baseline: per-image transforms in a DataLoader, eager fp32 NCHW model
    torch.manual_seed(0)
    base_cfg = cfg.replace(amp="none", channels_last=False, compile=False)
    base_model = build_model(base_cfg, device)
    base_optimizer = build_optimizer(base_model, base_cfg)
    base_loader = tutorial_loader(images, labels, cfg.batch_size, workers)

    def baseline(x, y):
        tutorial_step(base_model, x.to(device), y.to(device), base_optimizer)

    base_batches = _cycle(lambda _: iter(base_loader))

    _window(ours, ours_batches, warmup, cfg.batch_size, device)
    _window(baseline, base_batches, warmup, cfg.batch_size, device)
    base_rates, our_rates = [], []
    for _ in range(windows):
        base_rates.append(_window(baseline, base_batches, steps, cfg.batch_size, device))
        our_rates.append(_window(ours, ours_batches, steps, cfg.batch_size, device))
    ratios = [o / b for o, b in zip(our_rates, base_rates, strict=True)]
    return ThroughputResult(
        arch, cfg.batch_size, cfg.amp, statistics.median(base_rates),
        statistics.median(our_rates), statistics.median(ratios), windows, steps,
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        torch.__version__,
    )  # fmt: skip


def as_dict(result: ThroughputResult) -> dict:
    return asdict(result)

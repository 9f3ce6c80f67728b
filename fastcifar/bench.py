"""Training and evaluation throughput, fastcifar against the tutorial pipeline.

`build_pipeline` makes one configuration (the tutorial baseline, fastcifar's default for
the device, or the baseline with one optimisation switched on) as a step function and an
endless batch iterator, so the CLI and the pytest-benchmark suite time the same thing.
`compare_throughput` runs the baseline and the default side by side in one process, in
alternating windows so machine noise hits both alike, and reports medians.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fastcifar import heap
from fastcifar.ablations import ABLATIONS, OWN_LOADER
from fastcifar.baseline import tutorial_loader, tutorial_step
from fastcifar.config import TrainConfig
from fastcifar.data.dataset import Split
from fastcifar.recipes import recipe
from fastcifar.train.build import build_model, compiled, make_loader
from fastcifar.train.device import autocast, device_name, input_dtype, resolve_device
from fastcifar.train.engine import train_step
from fastcifar.train.optim import build_optimizer


@dataclass
class Pipeline:
    variant: str
    cfg: TrainConfig
    model: torch.nn.Module  # what training and evaluation run: compiled where cfg compiles
    step: object  # (x, y) -> None: one training step
    batches: object  # endless iterator of training (x, y) on the device
    eval_batches: object  # endless iterator of evaluation (x, y), cfg.eval_batch_size each
    device: torch.device


def variant_config(
    arch: str, variant: str, device: torch.device, batch_size: int | None
) -> TrainConfig:
    """The config a variant trains with: the baseline is fp32, NCHW, eager."""
    default = TrainConfig(**{**recipe(arch, device.type), "arch": arch, "track": False})
    if batch_size:
        default = default.replace(batch_size=batch_size)
    if variant == "default":
        return default
    base = default.replace(amp="none", channels_last=False, compile=False, fused_optimizer=False)
    return base.replace(**ABLATIONS.get(variant, {}))


def unavailable(arch: str, variant: str, device: torch.device) -> str | None:
    """Why `variant` of `arch` cannot be timed on `device`, or None when it can."""
    if variant == "fused" and arch != "cerberus":
        return "the fused block is CerberusNet's unit"
    if variant == "fused" and device.type != "cuda":
        return "the fused block's Triton kernels need CUDA (the CPU interpreter is no speed)"
    if variant == "native_loader":
        from fastcifar.ops import native

        available, why = native.load()
        return None if available else why
    if variant == "dali_loader":
        from fastcifar.data.dali_loader import import_dali
        from fastcifar.errors import UserError

        try:
            import_dali()
        except UserError as exc:
            return str(exc)
    return None


def loader_split(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig,
                 device: torch.device) -> Split:  # fmt: skip
    """Arrays where the configured loader reads them: on the device, DALI's on the host."""
    where = torch.device("cpu") if cfg.loader == "dali" else device
    return Split(torch.from_numpy(np.array(images)).to(where),
                 torch.from_numpy(np.array(labels)).to(where))  # fmt: skip


def endless(loader):
    """Batches forever: the loader's epochs one after another, each announced with
    `set_epoch` when the loader has it (fastcifar's loaders; not torch's DataLoader)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def build_pipeline(arch: str, variant: str, images: np.ndarray, labels: np.ndarray,
                   batch_size: int | None = None, device: torch.device | None = None,
                   overrides: dict | None = None) -> Pipeline:  # fmt: skip
    """`overrides`: config values on top of the variant's (e.g. a compile mode)."""
    device = device or resolve_device("auto")
    cfg = variant_config(arch, variant, device, batch_size).replace(**(overrides or {}))
    torch.manual_seed(0)
    model = build_model(cfg, device)
    step_model = compiled(model, cfg)
    optimizer = build_optimizer(model, cfg)
    # generators: a loader is built at its first batch (no evaluation copy unless timed)
    if variant in OWN_LOADER:
        split = loader_split(images, labels, cfg, device)

        def batches(train: bool):
            yield from endless(make_loader(cfg, split, device, input_dtype(cfg.amp), train=train))
    else:

        def batches(train: bool):
            size = cfg.batch_size if train else cfg.eval_batch_size
            for x, y in endless(tutorial_loader(images, labels, size, train=train)):
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x.to(device), y.to(device)

    if variant == "baseline":

        def step(x, y):
            tutorial_step(step_model, x, y, optimizer)
    else:

        def step(x, y):
            train_step(step_model, x, y, optimizer, None, cfg, device)

    return Pipeline(variant, cfg, step_model, step, batches(True), batches(False), device)


def time_steps(p: Pipeline, steps: int, batches=None) -> float:
    """Images per second over `steps` training steps, data loading included; `batches`
    replaces the pipeline's own batch iterator."""
    batches = batches if batches is not None else p.batches
    if p.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: earlier work stays out of the window
    start = time.perf_counter()
    for _ in range(steps):
        p.step(*next(batches))
    if p.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: end of the timed window
    return steps * p.cfg.batch_size / (time.perf_counter() - start)


@torch.no_grad()
def time_eval(p: Pipeline, steps: int) -> float:
    """Images per second of evaluation steps: the next evaluation batch from the
    pipeline's loader and a forward pass in eval mode."""
    p.model.eval()
    if p.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: earlier work stays out of the window
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        x, _ = next(p.eval_batches)
        with autocast(p.cfg.amp, p.device):
            p.model(x)
        images += len(x)
    if p.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: end of the timed window
    p.model.train()
    return images / (time.perf_counter() - start)


def matmul_peak_tflops(
    device: torch.device, dtype: torch.dtype, budget_s: float = 2.0, windows: int = 7
) -> float:
    """Measured dense matmul throughput, the yardstick for 'percent of peak': the median
    of `windows` timed windows. The square product grows from 256 to the size that
    saturates the device (8192 on a GPU, 2048 on these CPUs) while one product takes
    under a tenth of `budget_s`: a CPU without bf16 instructions emulates a bf16 product
    some fifty times slower than fp32, and a full-size one would take minutes. One
    window alone varied by 1.6x on a quiet 2-core CPU (benchmarks/NOTES.md)."""
    largest = 8192 if device.type == "cuda" else 2048
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        _time_products(a, b, 1)  # warm-up
        seconds = _time_products(a, b, 1)
        if size >= largest or seconds > budget_s / 10:
            break
        size *= 2
    reps = max(1, min(20, int(budget_s / windows / seconds)))
    rates = [2 * size**3 * reps / _time_products(a, b, reps) / 1e12 for _ in range(windows)]
    return statistics.median(rates)


def _time_products(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Seconds for `reps` products a @ b, device work included."""
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if a.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: end of the timed loop
    return time.perf_counter() - start


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
    tflops: float  # achieved by fastcifar's side, from the model's counted FLOPs
    peak_tflops: float  # dense matmul in the same dtype, measured in the same run
    percent_of_peak: float
    compile_mode: str  # fastcifar's side: "eager" or the torch.compile mode
    default_settings: bool  # fastcifar's side ran the device's recipe unchanged
    eval_batch_size: int
    baseline_eval_images_per_sec: float  # evaluation steps, loader included; medians
    fastcifar_eval_images_per_sec: float
    eval_speedup: float  # median of the per-window ratios
    against: str = "baseline"  # the other side: the tutorial ("baseline") or "default"
    settings: dict | None = None  # config values on top of fastcifar's default (`--set`)
    malloc: str = "system"  # the process's host-memory policy, both sides (`heap.state()`)


def compare_throughput(arch: str, images: np.ndarray, labels: np.ndarray, batch_size: int | None = None,
                       steps: int = 20, windows: int = 3, warmup: int = 3,
                       overrides: dict | None = None,
                       against: str = "baseline") -> ThroughputResult:  # fmt: skip
    """Training, then evaluation, of `against` (the tutorial "baseline", or fastcifar's
    "default") and fastcifar's default with `overrides` in alternating windows; an
    evaluation window sees about as many images as a training window."""
    ours = build_pipeline(arch, "default", images, labels, batch_size, overrides=overrides)
    # the tutorial trains at fastcifar's batch size; the default keeps its own
    base_batch = batch_size if against == "default" else ours.cfg.batch_size
    base = build_pipeline(arch, against, images, labels, base_batch)
    train = alternate(base, ours, time_steps, warmup, steps, windows)
    eval_steps = max(1, round(steps * ours.cfg.batch_size / ours.cfg.eval_batch_size))
    evals = alternate(base, ours, time_eval, 1, eval_steps, windows)
    rate = train.ours
    tflops = rate * training_flops_per_image(arch) / 1e12
    peak = matmul_peak_tflops(
        ours.device, torch.bfloat16 if ours.cfg.amp == "bf16" else torch.float32
    )
    return ThroughputResult(
        arch, ours.cfg.batch_size, ours.cfg.amp, train.base, rate, train.speedup, windows,
        steps, device_name(ours.device), torch.__version__, tflops, peak, 100 * tflops / peak,
        ours.cfg.compile_mode if ours.cfg.compile else "eager",
        ours.cfg == variant_config(arch, "default", ours.device, None),
        ours.cfg.eval_batch_size, evals.base, evals.ours, evals.speedup, against, overrides,
        heap.state(),
    )  # fmt: skip


@dataclass
class SideBySide:
    base: float  # median images/s over windows
    ours: float
    speedup: float  # median of the per-window ratios


def alternate(base, ours, timer, warmup: int, steps: int, windows: int) -> SideBySide:
    """`timer(side, steps)`, a rate, for both sides (pipelines, or anything `timer` runs)
    in alternating windows, after a warm-up."""
    timer(ours, warmup)
    timer(base, warmup)
    base_rates, our_rates = [], []
    for _ in range(windows):
        base_rates.append(timer(base, steps))
        our_rates.append(timer(ours, steps))
    ratios = [o / b for o, b in zip(our_rates, base_rates, strict=True)]
    return SideBySide(
        statistics.median(base_rates), statistics.median(our_rates), statistics.median(ratios)
    )


def training_flops_per_image(arch: str) -> float:
    """Counted FLOPs of one training image: forward plus a backward of twice its cost."""
    from fastcifar.catalog import catalog

    return 3 * 2 * catalog()[arch]["mult_adds"]


def as_dict(result: ThroughputResult) -> dict:
    return asdict(result)

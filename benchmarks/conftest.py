"""The benchmark suite's set-up: data, mode, and what every result records.

Quick mode (the default, run in CI) times a few steps on a small slice of the data so
the suite never rots; `--full` times real windows and is run by hand, its results saved
with `--benchmark-json=benchmarks/results/<name>-<device>.json`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar import heap
from fastcifar.bench import alternate, matmul_peak_tflops
from fastcifar.train.device import device_name, resolve_device

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.zip"


def pytest_configure(config):
    # FASTCIFAR_MALLOC, as the `fastcifar` command applies it; process-wide, so the
    # tutorial's side runs under the same policy
    heap.keep_freed_memory()


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="full-length benchmark windows")


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--full")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return resolve_device("auto")


@pytest.fixture(scope="session")
def train_arrays(full):
    """Real CIFAR-10 training images when available, else random ones of the same shape."""
    source = os.environ.get("FASTCIFAR_DATA") or (str(REAL_DATA) if REAL_DATA.exists() else None)
    if source:
        from fastcifar.data.dataset import resolve_arrays

        arrays, _ = resolve_arrays(source, download=False, log=lambda _: None)
        images, labels = arrays.train_images, arrays.train_labels
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(50_000) % 10
    n = len(labels) if full else 4096
    return np.array(images[:n]), np.array(labels[:n])


@pytest.fixture(scope="session")
def peak(device) -> dict:
    """Dense matmul TFLOP/s measured on this device in this session, per dtype."""
    return {
        "bf16": matmul_peak_tflops(device, torch.bfloat16),
        "fp32": matmul_peak_tflops(device, torch.float32),
    }


@pytest.fixture(scope="session")
def baselines() -> dict:
    """The baseline pipeline per (arch, batch size), warmed up, shared by the variants
    that are timed against it."""
    return {}


MEASURED = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def measured(request) -> dict:
    """This session's results, (arch, "train" | "eval", variant) -> the benchmark's
    extra_info, for the summary (kept on the config: the test modules may import this
    file a second time under another name)."""
    return request.config.stash.setdefault(MEASURED, {})


# The paired-steps benchmarks' results of this session, for the terminal summary
PAIRED: list[dict] = []


def pytest_terminal_summary(terminalreporter, config):
    """The paired-steps benchmarks' speedups; throughput against accuracy: this session's
    images/s of each architecture beside the test accuracy recorded for this machine in
    benchmarks/results (README's columns)."""
    mode = ("full windows" if config.getoption("--full") else
            "quick mode: a few steps at batch 32, a smoke test, not a measurement")  # fmt: skip
    if PAIRED:
        terminalreporter.section("paired steps")
        terminalreporter.write_line(f"this session ({mode.replace('batch 32', 'batch 8')})")
        terminalreporter.write_line("kind | arch | batch | steps a window | rounds | images/s "
                                    "without / with the swap | speedup (median of rounds)")  # fmt: skip
        for r in PAIRED:
            terminalreporter.write_line(
                f"{r['kind']} | {r['arch']} | {r['batch_size']} | {r['steps']} | {r['rounds']} | "
                f"{r['aten_images_per_sec']:,.0f} / {r['native_images_per_sec']:,.0f} | "
                f"{r['speedup']:.3f}x"
            )
    measured = config.stash.get(MEASURED, {})
    from fastcifar.report import switches_markdown, throughput_against_accuracy

    results = Path(__file__).resolve().parent / "results"
    machine = device_name(resolve_device("auto"))
    table = throughput_against_accuracy(measured, machine, results)
    if not table:
        return
    terminalreporter.section("throughput against accuracy")
    terminalreporter.write_line(f"images/s from this session ({mode}); test accuracy of the "
                                "default recipe as recorded for this machine")  # fmt: skip
    for line in table.splitlines():
        terminalreporter.write_line(line)
    switches: dict[str, dict[str, dict]] = {}
    for (arch, kind, variant), info in sorted(measured.items()):
        if kind == "train":
            switches.setdefault(arch, {})[variant] = info
    terminalreporter.write_line("")
    terminalreporter.write_line(f"speedups from this session ({mode}), each against its own "
                                "baseline rounds")  # fmt: skip
    for line in switches_markdown({machine: switches}).splitlines():
        terminalreporter.write_line(line)


def paired_windows(sides: dict, window, rounds: int) -> dict:
    """Alternate timed windows of sides "aten" and "native", `rounds` times
    (`fastcifar.bench.alternate`); median window times and the median of the per-round
    ratios aten / native."""

    def rate(side, _steps):
        start = time.perf_counter()
        window(side)
        return 1 / (time.perf_counter() - start)

    result = alternate(sides["aten"], sides["native"], rate, 1, 1, rounds)
    return {"aten_ms": 1e3 / result.base, "native_ms": 1e3 / result.ours,
            "speedup": result.speedup, "rounds": rounds}  # fmt: skip


def paired_training_steps(benchmark, arch: str, full: bool, device, *, kind: str, swap,
                          prepare=None, images: int, rounds: int, bf16: bool = True) -> dict:  # fmt: skip
    """Whole bf16 training steps (autocast, channels-last, SGD, random batches of the CPU
    recipe's size; the loader left out) of `arch` with ATen's layers ("aten") against
    the same model after `swap(model)` ("native"), `prepare(model)` applied to both first:
    alternating timed windows of about `images` images each, `rounds` times; fp32 steps
    (no autocast) without `bf16`. The result goes into `benchmark.extra_info` under
    `kind` and is returned."""
    from fastcifar.recipes import recipe

    batch = recipe(arch, "cpu").get("batch_size", 256) if full else 8
    return _paired_steps(benchmark, arch, full, device, kind=kind, swap=swap, prepare=prepare,
                         images=images, rounds=rounds, batch=batch, train=True, bf16=bf16)  # fmt: skip


def paired_evaluation_steps(benchmark, arch: str, full: bool, device, *, kind: str, swap,
                            prepare=None, images: int, rounds: int, bf16: bool = True) -> dict:  # fmt: skip
    """`paired_training_steps` for evaluation: the models in eval mode, forward only under
    `torch.no_grad()` and bf16 autocast (fp32 without `bf16`), batches of the evaluation's
    size (1,000)."""
    from fastcifar.config import TrainConfig

    batch = TrainConfig().eval_batch_size if full else 8
    return _paired_steps(benchmark, arch, full, device, kind=kind, swap=swap, prepare=prepare,
                         images=images, rounds=rounds, batch=batch, train=False, bf16=bf16)  # fmt: skip


def cpu_default_layers(model, arch: str) -> None:
    """The CPU's default native pooling and ReLU-BatchNorm layers for `arch`, where they are
    the default (`build_model`'s rules), so that a paired benchmark's sides differ only in
    what it swaps."""
    from fastcifar.models.pooling import native_pooling_available, use_native_pooling
    from fastcifar.models.relu_bn import relu_bn_by_default, use_relu_bn, use_relu_bn_pool

    if native_pooling_available():
        use_native_pooling(model)
    if relu_bn_by_default(arch):
        use_relu_bn(model)
        use_relu_bn_pool(model)


def winograd_in_full(model, fp32_tile: int = 2, grad_tile: int = 2) -> int:
    """Winograd's forward, input and weight gradients in every layer it takes, the fp32
    forward and input gradient as F(`fp32_tile` x `fp32_tile`, 3x3), the weight gradient
    as F(`grad_tile` x `grad_tile`, 3x3); returns how many."""
    from fastcifar.models.winograd import WinogradConv2d, use_winograd, use_winograd_weight_grad

    use_winograd(model)
    for layer in model.modules():
        if isinstance(layer, WinogradConv2d):
            layer.fp32_tile = fp32_tile
    return use_winograd_weight_grad(model, grad_tile)


def fp32_default_convolutions(model) -> None:
    """The fp32 default's Winograd convolutions: F(4x4, 3x3) forward, input and weight
    gradients in every layer Winograd takes."""
    from fastcifar.models.winograd import default_grad_tile

    winograd_in_full(model, fp32_tile=4, grad_tile=default_grad_tile("none"))


def _paired_steps(benchmark, arch, full, device, *, kind, swap, prepare, images, rounds, batch,
                  train, bf16=True) -> dict:  # fmt: skip
    if device.type != "cpu":
        pytest.skip("CPU kernels: the paired steps run on the CPU")
    import torch.nn.functional as F

    from fastcifar.models import create_model

    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    sides = {}
    for name in ("aten", "native"):
        torch.manual_seed(0)
        model = create_model(arch).to(memory_format=torch.channels_last)
        if prepare is not None:
            prepare(model)
        if name == "native":
            assert swap(model) > 0
        model.train(train)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if train else None
        sides[name] = (model, optimizer)
    steps = max(3, images // batch) if full else 1

    def window(side):
        model, optimizer = side
        for _ in range(steps):
            if not train:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    model(x)
                continue
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    result = {}
    benchmark.pedantic(lambda: result.update(paired_windows(sides, window, rounds if full else 1)),
                       rounds=1, iterations=1)  # fmt: skip
    per_step = {k: v / steps for k, v in result.items() if k.endswith("_ms")}
    info = dict(kind=kind, arch=arch, batch_size=batch, dtype="bfloat16" if bf16 else "float32",
                steps=steps, speedup=result["speedup"],
                rounds=result["rounds"], aten_images_per_sec=batch * 1e3 / per_step["aten_ms"],
                native_images_per_sec=batch * 1e3 / per_step["native_ms"],
                **environment(device))  # fmt: skip
    benchmark.extra_info.update(info)
    PAIRED.append(info)
    return info


def environment(device: torch.device) -> dict:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "malloc": heap.state(),
    }


def training_loader(kind: str, images, labels, batch: int, dtype, device):
    """(loader, None), or (None, why) when `kind` cannot run here: the training loader
    `fastcifar train` builds with the switches of the ablation `<kind>_loader` (crop and
    flip, no cutout). Kinds: tensor (the gather), native, dali; a `_prefetch` suffix adds
    the prefetch thread, and on dali a number, `dali_4096`, has each pipeline run make that
    many images."""
    from fastcifar.ablations import ABLATIONS
    from fastcifar.bench import loader_split
    from fastcifar.config import TrainConfig
    from fastcifar.errors import UserError
    from fastcifar.train.build import make_loader

    name, _, suffix = kind.partition("_")
    cfg = TrainConfig(batch_size=batch, cutout=0, track=False,
                      prefetch="on" if suffix == "prefetch" else "off",
                      dali_images_per_run=int(suffix) if suffix.isdigit() else 0,
                      **ABLATIONS[f"{name}_loader"])  # fmt: skip
    try:
        return make_loader(cfg, loader_split(images, labels, cfg, device), device, dtype,
                           train=True), None  # fmt: skip
    except UserError as exc:  # the native extension or DALI is missing here
        return None, str(exc)

"""Training and evaluation throughput of every architecture: the tutorial baseline,
fastcifar's default for the device, and the baseline with each optimisation alone.

Each result's extra_info holds images/s, the speedup over the baseline measured earlier
in the same session, achieved TFLOP/s from the model's counted FLOPs, and the percent of
the dense matmul peak measured in the same session.
"""

from __future__ import annotations

import pytest

from fastcifar.ablations import VARIANTS
from fastcifar.bench import (
    build_pipeline,
    time_eval,
    time_steps,
    training_flops_per_image,
    unavailable,
)
from fastcifar.models import list_models
from fastcifar.train.device import native_bf16

from .conftest import environment

QUICK_ARCHS = ("lenet", "conv3", "cerberus")


def archs(full_run: bool) -> list[str]:
    return list_models() if full_run else list(QUICK_ARCHS)


def pytest_generate_tests(metafunc):
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", archs(metafunc.config.getoption("--full")))


def _steps(full: bool, arch: str) -> tuple[int, int]:
    """(warm-up steps, timed steps per round)."""
    if full:
        return 3, 20 if arch in ("lenet", "conv3", "conv4_relu") else 6
    return 1, 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_throughput(
    benchmark, arch, variant, full, device, train_arrays, peak, baseline_rates, measured
):
    reason = unavailable(arch, variant, device)
    if reason:
        pytest.skip(reason)
    if variant == "compile" and not full and device.type == "cpu":
        pytest.skip("compiling on the CPU takes minutes; --full measures it")
    if variant == "amp" and not full and not native_bf16(device):
        pytest.skip("bf16 is emulated on this CPU (7x to 13x slower); --full measures it")
    batch = 128 if full else 32
    p = build_pipeline(arch, variant, *train_arrays, batch_size=batch, device=device)
    warmup, steps = _steps(full, arch)
    time_steps(p, warmup)
    rates = []

    def run():
        rates.append(time_steps(p, steps))

    benchmark.pedantic(run, rounds=3 if full else 1, iterations=1)
    rate = sorted(rates)[len(rates) // 2]
    achieved = rate * training_flops_per_image(arch) / 1e12
    dtype = "bf16" if p.cfg.amp == "bf16" else "fp32"
    key = (arch, batch)
    if variant == "baseline":
        baseline_rates[key] = rate
    benchmark.extra_info.update(
        arch=arch, variant=variant, kind="train", batch_size=batch, amp=p.cfg.amp,
        channels_last=p.cfg.channels_last, compile=p.cfg.compile, loader=p.cfg.loader,
        native=p.cfg.native, fused=p.cfg.fused, images_per_sec=rate,
        speedup=rate / baseline_rates[key] if key in baseline_rates else None,
        tflops=achieved, percent_of_peak=100 * achieved / peak[dtype], peak_tflops=peak[dtype],
        mode="full" if full else "quick", **environment(device),
    )  # fmt: skip
    measured[(arch, "train", variant)] = dict(benchmark.extra_info)
    assert rate > 0


@pytest.mark.parametrize("variant", ["baseline", "default"])
def test_eval_throughput(benchmark, arch, variant, full, device, train_arrays, measured):
    batch = 512 if full else 64
    p = build_pipeline(arch, variant, *train_arrays, device=device,
                       overrides={"eval_batch_size": batch})  # fmt: skip
    steps = 10 if full else 2
    time_eval(p, 1)  # warm-up
    rates = []
    benchmark.pedantic(
        lambda: rates.append(time_eval(p, steps)), rounds=3 if full else 1, iterations=1
    )
    rate = sorted(rates)[len(rates) // 2]
    benchmark.extra_info.update(arch=arch, variant=variant, kind="eval", batch_size=batch, amp=p.cfg.amp,
                                images_per_sec=rate, **environment(device))  # fmt: skip
    measured[(arch, "eval", variant)] = dict(benchmark.extra_info)
    assert rate > 0

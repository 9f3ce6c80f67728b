"""Training and evaluation throughput of every architecture: the tutorial baseline,
fastcifar's default for the device, and the baseline with each optimisation alone.

Each result's extra_info holds images/s, the speedup over the baseline, achieved TFLOP/s
from the model's counted FLOPs, and the percent of the dense matmul peak measured in the
same session. The speedup is paired: before each timed round of a variant the baseline
runs as many steps, untimed by pytest-benchmark, and the speedup is the median of the
rounds' ratios, so that a machine whose speed drifts during the session (seen here:
rates moving by half between tests) still gives side-by-side ratios.
"""

from __future__ import annotations

import statistics

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
    benchmark, arch, variant, full, device, train_arrays, peak, baselines, measured
):
    reason = unavailable(arch, variant, device)
    if reason:
        pytest.skip(reason)
    if variant == "compile" and not full and device.type == "cpu":
        pytest.skip("compiling on the CPU takes minutes; --full measures it")
    if variant == "amp" and not full and not native_bf16(device):
        pytest.skip("bf16 is emulated on this CPU (7x to 13x slower); --full measures it")
    batch = 128 if full else 32
    warmup, steps = _steps(full, arch)
    p = build_pipeline(arch, variant, *train_arrays, batch_size=batch, device=device)
    time_steps(p, warmup)
    if variant == "baseline":
        baselines[(arch, batch)] = p
    elif (arch, batch) not in baselines:  # this variant selected without its baseline
        base = build_pipeline(arch, "baseline", *train_arrays, batch_size=batch, device=device)
        time_steps(base, warmup)
        baselines[(arch, batch)] = base
    base = baselines[(arch, batch)]
    rates, base_rates = [], []

    def run():
        rates.append(time_steps(p, steps))

    def baseline_round():  # untimed by pytest-benchmark; pairs each round with a baseline one
        if p is not base:
            base_rates.append(time_steps(base, steps))

    benchmark.pedantic(run, setup=baseline_round, rounds=3 if full else 1, iterations=1)
    rate = statistics.median(rates)
    base_rate, speedup = rate, 1.0  # the baseline itself
    if base_rates:
        base_rate = statistics.median(base_rates)
        speedup = statistics.median(r / b for r, b in zip(rates, base_rates, strict=True))
    achieved = rate * training_flops_per_image(arch) / 1e12
    dtype = "bf16" if p.cfg.amp == "bf16" else "fp32"
    benchmark.extra_info.update(
        arch=arch, variant=variant, kind="train", batch_size=batch, amp=p.cfg.amp,
        channels_last=p.cfg.channels_last, compile=p.cfg.compile, loader=p.cfg.loader,
        native=p.cfg.native, fused=p.cfg.fused, images_per_sec=rate,
        baseline_images_per_sec=base_rate, speedup=speedup,
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

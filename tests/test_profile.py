"""`fastcifar profile`'s accounting: each kernel's time counted once, and the achieved
rates of the convolutions from counted FLOPs (hand counts for lenet)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import fastcifar.profile as profiling
from fastcifar.profile import MAX_PASSES, family_rates, profile_training, top_kernels

from .conftest import make_arrays


def event(key, device_type, device_us=0.0, cpu_us=0.0, annotation=False, count=1, flops=0):
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                           self_cpu_time_total=cpu_us, is_user_annotation=annotation, count=count,
                           flops=flops)  # fmt: skip


def test_on_a_gpu_each_kernel_counts_once():
    """The operator that launched a kernel carries its time too, and a step annotation spans
    both kernels: only the kernels are rows, and their shares add up to one."""
    averages = [
        event("aten::cudnn_convolution", DeviceType.CPU, device_us=300, cpu_us=20, count=2),
        event("sm90_xmma_fprop_implicit_gemm", DeviceType.CUDA, device_us=300, count=2),
        event("ProfilerStep#1", DeviceType.CUDA, device_us=400, annotation=True),
        event("aten::relu", DeviceType.CPU, device_us=100, cpu_us=5),
        event("elementwise_kernel", DeviceType.CUDA, device_us=100),
    ]
    rows = top_kernels(averages, on_gpu=True, counted={"convolution forward": 6e9}, top=10)
    assert [(r["name"], r["share"]) for r in rows] == [
        ("sm90_xmma_fprop_implicit_gemm", 0.75),
        ("elementwise_kernel", 0.25),
    ]
    assert rows[0]["tflops"] is None  # a device kernel's FLOPs are not split from its operator's
    (conv,) = family_rates(averages, on_gpu=True, counted={"convolution forward": 6e9})
    assert conv.family == "convolution forward" and conv.ms == pytest.approx(0.3)
    assert conv.tflops == pytest.approx(6e9 / 300e-6 / 1e12)


def test_on_the_cpu_the_convolutions_rates_come_from_counted_flops(tmp_path):
    """lenet, per image: conv1 6x28x28 outputs x 75 mult-adds, conv2 16x10x10 x 150. The
    backward computes conv1's weight gradient and both gradients of conv2."""
    train, labels, _, _ = make_arrays(n_train=64)
    batch, steps = 16, 2
    rows, families, fidelity, _ = profile_training("lenet", train, labels, steps=steps, batch_size=batch,
                                      variant="default", trace=tmp_path / "t.json",
                                      device=torch.device("cpu"))  # fmt: skip
    conv1, conv2 = 6 * 28 * 28 * 75, 16 * 10 * 10 * 150
    rates = {f.family: f for f in families}
    images = batch * steps
    assert rates["convolution forward"].flops == 2 * (conv1 + conv2) * images
    assert rates["convolution backward"].flops == 2 * (conv1 + 2 * conv2) * images
    assert rates["matmul"].flops > 0 and all(f.ms > 0 for f in families)
    by_name = {r["name"]: r for r in rows}
    forward = by_name["aten::mkldnn_convolution"]  # the one operator that runs them here
    assert forward["tflops"] == pytest.approx(rates["convolution forward"].tflops)
    assert sum(r["share"] for r in rows) <= 1 + 1e-9
    assert fidelity.step_ms > 0 and fidelity.profiled_ms > 0
    assert 1 <= fidelity.passes <= MAX_PASSES
    assert fidelity.faults_per_step == 0 or fidelity.passes == MAX_PASSES


def test_the_steps_are_profiled_again_until_a_pass_takes_no_page_faults(tmp_path, monkeypatch):
    """Each pass reads the fault counter before and after: 40 and 16 faults in the
    first two passes, none in the third, which is the one reported."""
    counts = iter([0, 40, 100, 116, 200, 200, 300, 300])
    monkeypatch.setattr(profiling, "_page_faults", lambda: next(counts))
    train, labels, _, _ = make_arrays(n_train=64)
    *_, fidelity, _ = profile_training("lenet", train, labels, steps=2, batch_size=16,
                                       variant="default", trace=tmp_path / "t.json",
                                       device=torch.device("cpu"))  # fmt: skip
    assert (fidelity.passes, fidelity.faults_per_step) == (3, 0)
    counts = iter(range(0, 1000, 10))  # 10 faults in every pass: it stops at MAX_PASSES
    monkeypatch.setattr(profiling, "_page_faults", lambda: next(counts))
    *_, fidelity, _ = profile_training("lenet", train, labels, steps=2, batch_size=16,
                                       variant="default", trace=tmp_path / "t.json",
                                       device=torch.device("cpu"))  # fmt: skip
    assert (fidelity.passes, fidelity.faults_per_step) == (MAX_PASSES, 5)


def test_the_fused_block_has_rates_of_its_own():
    """The Triton kernels of the fused unit run under its custom op, which the FLOP counter
    counts through the op's registered formula (tests/test_fused.py)."""
    averages = [
        event("fastcifar::conv_bn_relu_train", DeviceType.CPU, device_us=500, cpu_us=40),
        event("_conv3x3_kernel", DeviceType.CUDA, device_us=400),
        event("_affine_kernel", DeviceType.CUDA, device_us=100),
        event("fastcifar::conv_bn_relu_backward", DeviceType.CPU, device_us=2000, cpu_us=90),
    ]
    counted = {"fused conv-BN-ReLU forward": 1e9, "fused conv-BN-ReLU backward": 2e9}
    rates = {f.family: f for f in family_rates(averages, on_gpu=True, counted=counted)}
    assert set(rates) == {"fused conv-BN-ReLU forward", "fused conv-BN-ReLU backward"}
    assert rates["fused conv-BN-ReLU forward"].tflops == pytest.approx(1e9 / 500e-6 / 1e12)
    assert rates["fused conv-BN-ReLU backward"].tflops == pytest.approx(2e9 / 2000e-6 / 1e12)


@pytest.mark.parametrize("loader", ["tensor", "dali"])
def test_the_host_profile_sees_the_loader_and_the_step(tmp_path, loader):
    """`--host`: the Python side of the same training steps, the batches of the loader
    that `--set` chose and the step's launches among its functions, and the main
    thread's CPU time a step."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    train, labels, _, _ = make_arrays(n_train=64)
    _, _, _, host = profile_training("lenet", train, labels, steps=2, batch_size=16,
                                  variant="default", trace=tmp_path / "t.json",
                                  device=torch.device("cpu"), host_top=10_000,
                                  overrides={"loader": loader})  # fmt: skip
    iterators = {
        f["name"].split(":")[0] for f in host.functions if f["name"].endswith("(__iter__)")
    }
    assert {"tensor": "data/loader.py", "dali": "data/dali_loader.py"}[loader] in iterators
    (step,) = [f for f in host.functions if n_is(f, "train/engine.py", "train_step")]
    assert step["calls"] == 2 and 0 < step["own_ms"] <= step["total_ms"]
    assert host.cpu_ms_per_step > 0 and host.wall_ms_per_step > 0
    own = [f["own_ms"] for f in host.functions]
    assert own == sorted(own, reverse=True)


def n_is(row: dict, path: str, function: str) -> bool:
    return row["name"].startswith(path + ":") and row["name"].endswith(f"({function})")

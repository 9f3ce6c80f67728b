"""CerberusNet's three conv-BN-ReLU layer shapes at batch 512: the Triton-fused block
against cuDNN conv + BatchNorm + ReLU in eager mode and under torch.compile, forward and
forward + backward, with TFLOP/s and the percent of the bf16 matmul peak measured in the
same session. Each is timed as Python launches it ("stream") and as a CUDA graph replay
("graph"), which leaves out the host's launch overhead: the kernels' own time. Needs a
GPU: interpreter timings on the CPU mean nothing."""

from __future__ import annotations

import pytest
import torch

from .conftest import environment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times GPU kernels")

SHAPES = [(64, 32), (128, 16), (256, 8)]  # (channels, spatial size) of the three macro blocks


def _eager_unit(channels: int):
    return torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.BatchNorm2d(channels))  # fmt: skip


def _unit(kind: str, channels: int):
    if kind.startswith("fused"):
        from fastcifar.models.fused import FusedConvBNReLU

        return FusedConvBNReLU(channels, channels)
    unit = _eager_unit(channels)
    return torch.compile(unit) if kind == "compile" else unit


def _graphed(step):
    """`step` captured in a CUDA graph (after a warm-up on a side stream, as capture
    requires); returns the graph's replay."""
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.mark.parametrize("launch", ["stream", "graph"])
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("kind", ["eager", "compile", "fused", "fused_flat", "fused_tma"])
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_block(benchmark, monkeypatch, kind, pass_, launch, channels, size, peak):
    device = torch.device("cuda")
    if kind.startswith("fused_"):  # the convolution's loop flat or TMA-fed (FASTCIFAR_CONV_LOOP)
        from fastcifar.ops import conv_bn_relu

        monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", kind.removeprefix("fused_"))
    unit = _unit(kind, channels).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(512, channels, size, size, device=device, dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last).requires_grad_(pass_ == "forward_backward")
    grad = torch.randn_like(x)

    def step():  # no autocast weight cache: a graph must recast what it captured
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not kind.startswith("fused"),
                            cache_enabled=False):  # fmt: skip
            out = unit(x)
        if pass_ == "forward_backward":
            out.backward(grad)

    for _ in range(3):  # compiles and autotunes before anything is timed or captured
        step()
    torch.cuda.synchronize()
    call = _graphed(step) if launch == "graph" else step

    def run():
        call()
        torch.cuda.synchronize()  # host sync: inside the timed call

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    flops = (
        2 * 512 * size * size * channels * channels * 9 * (3 if pass_ == "forward_backward" else 1)
    )
    tflops = flops / benchmark.stats["median"] / 1e12
    benchmark.extra_info.update(kind=kind, pass_=pass_, launch=launch, channels=channels, size=size,
                                batch_size=512,
                                tflops=tflops, percent_of_peak=100 * tflops / peak["bf16"],
                                **environment(device))  # fmt: skip

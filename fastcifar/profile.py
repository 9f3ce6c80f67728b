"""`fastcifar profile --arch NAME`: a few training steps under torch.profiler, a Chrome
trace, the top kernels by time with their share, calls, time and achieved TFLOP/s where
known, and the achieved TFLOP/s of the convolutions and matmuls as a whole. With
`--host N`, the same number of steps again under cProfile: the host's side (the loader,
the launches), which bounds a small model's step on a GPU.

On the CPU a "kernel" is an operator's own time; on a GPU it is a device kernel. FLOPs
come from `torch.utils.flop_counter` over one forward and backward pass of the same batch
(the profiler's own count, `with_flops`, slowed CerberusNet's CPU step 2.8x).

On the CPU the profiler's own records take the heap holes that a step's freed
activations leave (`fastcifar.heap`), so the next steps fault fresh memory in until the
heap has grown around them: the first profiled CerberusNet steps ran 1.5x slower, all
of it in the operators that wrote new tensors. The steps are profiled again, up to
MAX_PASSES times, until a pass takes no page faults, and only that pass is reported,
beside the step's time without the profiler.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.atomic import write_atomic
from fastcifar.bench import build_pipeline
from fastcifar.errors import UserError
from fastcifar.train.device import autocast

try:
    import resource
except ImportError:  # not POSIX: page faults unknown, so one profiled pass
    resource = None

# the operators the FLOP counter counts each family under, and the operators that run (on
# the CPU) or launch (on a GPU) the family's kernels, not the ones that only dispatch to them
FAMILIES = {
    "convolution forward": (("aten.convolution",), (
        "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_slow_conv2d_forward",
        "aten::miopen_convolution", "aten::_nnpack_spatial_convolution")),
    "convolution backward": (("aten.convolution_backward",), (
        "aten::convolution_backward", "aten::_slow_conv2d_backward")),
    "convolution weight gradient (AMX)": (("fastcifar.conv3x3_weight_grad",), (
        "fastcifar::conv3x3_weight_grad",)),
    "fused conv-BN-ReLU forward": (("fastcifar.conv_bn_relu_train",), (
        "fastcifar::conv_bn_relu_train", "fastcifar::conv_bn_relu_eval")),
    "fused conv-BN-ReLU backward": (("fastcifar.conv_bn_relu_backward",), (
        "fastcifar::conv_bn_relu_backward",)),
    "matmul": (("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"),
               ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
}  # fmt: skip


@dataclass
class FamilyRate:
    family: str
    ms: float  # time of its kernels over the profiled steps
    flops: float  # over the profiled steps; 0 where nothing counts them

    @property
    def tflops(self) -> float | None:
        return self.flops / self.ms / 1e9 if self.flops and self.ms > 0 else None


MAX_PASSES = 8  # profiled passes of the steps at most; the last one is reported


@dataclass
class Fidelity:
    """How closely the reported pass matches the step run without the profiler."""

    step_ms: float  # a step's wall time without the profiler, measured first
    profiled_ms: float  # a step's kernel time in the reported pass
    passes: int  # profiled passes run, the reported one last
    faults_per_step: float  # page faults a step in the reported pass (0 where unknown)


@dataclass
class HostProfile:
    cpu_ms_per_step: float  # the main thread's CPU time a step, measured without cProfile
    wall_ms_per_step: float  # the same steps' wall time, the device's work included
    functions: list[dict]  # the top functions by own time: name, calls, own and total ms


def profile_training(arch: str, images, labels, *, steps: int, batch_size: int | None, variant: str,
                     trace: Path, top: int = 15, device: torch.device | None = None,
                     overrides: dict | None = None, host_top: int = 0,
                     ) -> tuple[list[dict], list[FamilyRate], Fidelity, HostProfile | None]:  # fmt: skip
    """Profile `steps` training steps (after two warm-up steps and the same steps
    timed without the profiler); write the Chrome trace. Returns the top kernels, each
    family's achieved rate, the profile's fidelity and, with `host_top`, the host's side
    of as many steps again. `overrides`: config values on top of the variant's (`--set`)."""
    trace.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(trace.parent, os.W_OK):
        raise UserError(f"cannot write the trace into {trace.parent}")
    p = build_pipeline(arch, variant, images, labels, batch_size, device, overrides)
    on_gpu = p.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    for _ in range(2):
        p.step(*next(p.batches))
    cpu_ms, step_ms = _timed_steps(p, steps, sync)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    passes, faults = 0, None
    while passes < MAX_PASSES and faults != 0:
        passes += 1
        before = _page_faults()
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(steps):
                p.step(*next(p.batches))
            sync()  # host sync: let the last kernels land in the trace
        faults = _page_faults() - before
    export_trace(prof, trace)
    averages = prof.key_averages()
    host = profile_host(p, steps, host_top, cpu_ms, step_ms, sync) if host_top else None
    counted = {name: steps * flops for name, flops in step_flops(p, *next(p.batches)).items()}
    kernels = top_kernels(averages, on_gpu, counted, top)
    profiled_ms = sum(_time_us(e, on_gpu) for e in kernel_events(averages, on_gpu)) / 1e3 / steps
    fidelity = Fidelity(step_ms, profiled_ms, passes, faults / steps)
    return kernels, family_rates(averages, on_gpu, counted), fidelity, host


def _page_faults() -> int:
    """This process's page faults so far (minor ones: memory touched the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _timed_steps(p, steps: int, sync) -> tuple[float, float]:
    """The main thread's CPU time and the wall time a step, in ms, over `steps` steps
    run without any profiler."""
    sync()
    start, wall_start = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        p.step(*next(p.batches))
    cpu_ms = 1e3 * (time.thread_time() - start) / steps
    sync()
    return cpu_ms, 1e3 * (time.perf_counter() - wall_start) / steps


def profile_host(p, steps: int, top: int, cpu_ms: float, wall_ms: float, sync) -> HostProfile:
    """The main thread's CPU time and the wall time a step (`_timed_steps`; the nearer
    the two, the more the host bounds the step), then the `top` Python functions and
    builtins by own time over `steps` more steps under cProfile. cProfile's times are
    wall time, so a wait (for a loader's batch, for the GPU) shows in the function that
    waits, which the CPU time leaves out; and it slows the Python it times, so its times
    are for comparing, the CPU time a step for rates."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        p.step(*next(p.batches))
    profiler.disable()
    sync()
    rows = [
        {"name": _function_name(*key), "calls": calls, "own_ms": 1e3 * own, "total_ms": 1e3 * total}
        for key, (_, calls, own, total, _) in pstats.Stats(profiler).stats.items()
    ]
    rows.sort(key=lambda r: r["own_ms"], reverse=True)
    return HostProfile(cpu_ms, wall_ms, rows[:top])


def _function_name(path: str, line: int, name: str) -> str:
    """`package/module.py:LINE(function)`, or a builtin's own description."""
    if path == "~":
        return name
    return f"{'/'.join(Path(path).parts[-2:])}:{line}({name})"


def step_flops(p, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """FLOPs of one training step's convolutions (forward, backward; eager or fused),
    counted on the uncompiled model; the optimiser does not step."""
    model = getattr(p.model, "_orig_mod", p.model)
    with FlopCounterMode(display=False) as counter, autocast(p.cfg.amp, p.device):
        # the step's own precision: its layers choose their kernels by it
        torch.nn.functional.cross_entropy(model(x.float()), y).backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return {family: sum(by_op.get(op, 0) for op in ops) for family, (ops, _) in FAMILIES.items()}


def _time_us(event, on_gpu: bool) -> float:
    return event.self_device_time_total if on_gpu else event.self_cpu_time_total


def kernel_events(averages, on_gpu: bool) -> list:
    """The rows that hold time once each. On a GPU the device kernels alone: the CPU
    operators that launch them carry the same time again, and user annotations span them."""
    if not on_gpu:
        return [e for e in averages if e.self_cpu_time_total > 0]
    return [
        e
        for e in averages
        if e.device_type != DeviceType.CPU
        and not getattr(e, "is_user_annotation", False)
        and e.self_device_time_total > 0
    ]


def family_time_us(averages, on_gpu: bool) -> dict[str, dict[str, float]]:
    """Each family's time by operator name: on a GPU the time of the kernels each
    operator launched itself, on the CPU the operator's own time."""
    times: dict[str, dict[str, float]] = {family: {} for family in FAMILIES}
    for e in averages:
        if e.device_type != DeviceType.CPU:
            continue
        for family, (_, names) in FAMILIES.items():
            if e.key in names and _time_us(e, on_gpu) > 0:
                times[family][e.key] = _time_us(e, on_gpu)
    return times


def family_rates(averages, on_gpu: bool, counted: dict[str, float]) -> list[FamilyRate]:
    """Achieved TFLOP/s of each family that ran, from the FLOPs counted for it."""
    rates = []
    for family, by_name in family_time_us(averages, on_gpu).items():
        seconds = sum(by_name.values()) / 1e6
        if seconds > 0:
            rates.append(FamilyRate(family, 1e3 * seconds, counted.get(family, 0)))
    return rates


def top_kernels(averages, on_gpu: bool, counted: dict[str, float], top: int) -> list[dict]:
    """The `top` kernels by time. A kernel's TFLOP/s, on the CPU where one operator holds
    all of a family's time: that family's."""
    events = kernel_events(averages, on_gpu)
    total = sum(_time_us(e, on_gpu) for e in events)
    whole_family = {}  # operator name -> counted FLOPs, where it alone ran its family
    if not on_gpu:
        for family, by_name in family_time_us(averages, on_gpu).items():
            if family in counted and len(by_name) == 1:
                whole_family[next(iter(by_name))] = counted[family]
    rows = []
    for e in sorted(events, key=lambda e: _time_us(e, on_gpu), reverse=True)[:top]:
        seconds = _time_us(e, on_gpu) / 1e6
        flops = whole_family.get(e.key, 0)
        rows.append({
            "name": e.key,
            "share": _time_us(e, on_gpu) / total,
            "calls": e.count,
            "ms": seconds * 1e3,
            "tflops": (flops / seconds / 1e12) if flops and seconds > 0 else None,
        })  # fmt: skip
    return rows


def export_trace(prof, trace: Path) -> None:
    """The Chrome trace, written atomically: the profiler only logs a failed write."""
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(raw))
        if not raw.exists():
            raise UserError("the profiler wrote no trace")
        write_atomic(trace, lambda f: f.write(raw.read_bytes()))

"""`fastcifar profile --arch NAME`: a few training steps under torch.profiler, a Chrome
trace, and the top kernels by time with their share, calls, time and achieved TFLOP/s
where the profiler counts FLOPs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fastcifar.atomic import write_atomic
from fastcifar.bench import build_pipeline
from fastcifar.errors import UserError


def profile_training(arch: str, images, labels, *, steps: int, batch_size: int | None, variant: str,
                     trace: Path, top: int = 15) -> list[dict]:  # fmt: skip
    """Profile `steps` training steps (after two warm-up steps); write the Chrome trace."""
    trace.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(trace.parent, os.W_OK):
        raise UserError(f"cannot write the trace into {trace.parent}")
    p = build_pipeline(arch, variant, images, labels, batch_size)
    for _ in range(2):
        p.step(*next(p.batches))
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if p.device.type == "cuda" else []
    )
    with profile(activities=activities, with_flops=True, record_shapes=False) as prof:
        for _ in range(steps):
            p.step(*next(p.batches))
        if p.device.type == "cuda":
            torch.cuda.synchronize()  # host sync: let the last kernels land in the trace
    export_trace(prof, trace)
    on_gpu = p.device.type == "cuda"
    events = [
        e
        for e in prof.key_averages()
        if (e.self_device_time_total if on_gpu else e.self_cpu_time_total) > 0
    ]
    time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in events)
    rows = []
    for e in sorted(events, key=time_of, reverse=True)[:top]:
        seconds = time_of(e) / 1e6
        rows.append({
            "name": e.key,
            "share": time_of(e) / total,
            "calls": e.count,
            "ms": seconds * 1e3,
            "tflops": (e.flops / seconds / 1e12) if e.flops and seconds > 0 else None,
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

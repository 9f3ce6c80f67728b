"""Device, precision and thread set-up, decided once per run."""

from __future__ import annotations

import contextlib
import gc
import os
import platform

import torch

from fastcifar.config import DEVICES
from fastcifar.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:  # checked here too: the recipe needs the device before the config
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here")
    return torch.device(name)


# Without bf16 instructions torch emulates bf16 arithmetic on the CPU: on an AVX2-only
# CPU a bf16 training step ran 7x (lenet) to 13x (conv5) slower than fp32
# (benchmarks/NOTES.md).
SLOW_BF16 = (
    "no bf16 instructions (AVX512-BF16 or AMX) on this CPU: bf16 autocast is emulated,"
    " several times slower than fp32"
)
BF16_INSTRUCTIONS = ("AMX", "AVX512-BF16")


def cpu_instructions() -> str:
    """The CPU's widest instruction set for training: AMX, AVX512-BF16, or torch's own
    capability name (AVX512, AVX2, ...). It decides the CPU's speed more than its model."""
    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    for name, probe in probes.items():  # torch.cpu's probes are private: absent means no
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 in hardware: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_instructions() in BF16_INSTRUCTIONS


def fastest_amp(device: torch.device) -> str:
    """What a bare `--amp` means on `device`: bf16 where it runs in hardware, else fp32."""
    return "bf16" if native_bf16(device) else "none"


def computes_in(amp: str, device: torch.device) -> bool:
    """Whether `device` runs autocast dtype `amp` in hardware (fp16 only on CUDA)."""
    return {"none": True, "fp16": device.type == "cuda", "bf16": native_bf16(device)}[amp]


def check_amp(amp: str, device: torch.device) -> str | None:
    """Rejects an autocast dtype the device cannot run; returns a warning for one it runs
    slowly, else None."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    if device.type == "cpu" and not computes_in(amp, device):
        return f"{SLOW_BF16}; --no-amp trains in fp32"
    return None


def check_threads(threads: int) -> str | None:
    """A warning when more CPU threads are asked for than this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and threads > cores:
        return f"--threads {threads} is more than the {cores} CPU cores here: threads will fight"
    return None


def autocast(amp: str, device: torch.device):
    """The autocast context for a forward pass (a no-op context when amp is 'none')."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def input_dtype(amp: str) -> torch.dtype:
    """The dtype the loader should emit: the autocast dtype saves a cast inside the model."""
    return AMP_DTYPES.get(amp, torch.float32)


def configure_runtime(threads: int, deterministic: bool, seed: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def device_name(device: torch.device) -> str:
    """What the results ran on: the GPU's name, or the CPU's model, core count and
    instruction set (two machines of one model name can differ in AVX-512)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {cpu_instructions()}"


def free_earlier_runs(device_type: str) -> None:
    """Give back what an earlier run in this process still holds, before the next one
    allocates. Its frames, and with them its model, optimiser and data, can live on in
    reference cycles that only the collector breaks: a failed run's exception (Optuna keeps
    it in a frame of its traceback), and the frames torch's lazy imports hold when the
    process builds its first optimiser. On CUDA the freed blocks go back to the device."""
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()

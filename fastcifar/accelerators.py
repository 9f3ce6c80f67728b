"""The optional accelerated paths, detected in one place: CPU bf16, CUDA, the native
extension, Winograd convolutions, DALI, Triton, MLflow and Optuna. `fastcifar doctor`
prints this."""

from __future__ import annotations

import importlib
import os

import torch

from fastcifar import heap


def _module(name: str) -> tuple[bool, str]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return False, f"not installed ({exc.name})"
    return True, f"version {getattr(module, '__version__', '?')}"


def report() -> list[tuple[str, bool, str]]:
    """(path, available, detail) for every optional path."""
    from fastcifar.train.device import SLOW_BF16, native_bf16

    rows = [("torch", True, f"{torch.__version__}, {torch.get_num_threads()} CPU threads")]
    if native_bf16(torch.device("cpu")):
        rows.append(("cpu-bf16", True, "bf16 instructions: --amp trains in bf16 on the CPU"))
    else:
        rows.append(("cpu-bf16", False, f"{SLOW_BF16}; --amp trains in fp32 on the CPU"))
    if torch.cuda.is_available():
        rows.append(("cuda", True, f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"))
    else:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        rows.append(("cuda", False, f"no GPU visible ({build} of torch)"))
    from fastcifar.ops import native

    ok, why = native.load()
    if ok:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
            "fastcifar::augment_batch", "CUDA"
        )
        why += "; CPU kernels" + (
            " and CUDA kernels" if has_cuda else ", no CUDA kernels (built without)"
        )
    if ok:
        from fastcifar.models.pooling import native_pooling_available

        why += (
            "; bf16 max pooling (AVX-512)"
            if native_pooling_available()
            else "; max pooling stays with ATen (no AVX-512)"
        )
        from fastcifar.models.relu_bn import relu_bn_default_archs

        archs = relu_bn_default_archs()
        if archs is None:
            why += "; ReLU-BatchNorm pairs as one layer, with the max pools after them"
        elif archs:
            why += (f"; ReLU-BatchNorm pairs as one layer in fp32, with the max pools after "
                    f"them, for {', '.join(archs)}")  # fmt: skip
        from fastcifar.models.amx_conv import amx_conv_available

        if amx_conv_available():
            why += "; 3x3 weight gradients on AMX tiles"
    rows.append(("native", ok, why))
    rows.append(winograd_row())
    ok, detail = _module("nvidia.dali")
    rows.append(("dali", ok, detail + ("" if ok else "; pip install 'fastcifar[dali]'")))
    rows.append(triton_row())
    rows.append(malloc_row())
    for name, module in (("mlflow", "mlflow"), ("optuna", "optuna")):
        ok, detail = _module(module)
        rows.append((name, ok, detail + ("" if ok else "; pip install 'fastcifar[track]'")))
    return rows


def winograd_row() -> tuple[str, bool, str]:
    """Whether Winograd convolutions run here, in bf16 and in fp32, and which one
    `--winograd auto` picks (fastcifar/models/winograd.py)."""
    from fastcifar.models.winograd import fp32_by_default, winograd_available

    bf16, why = winograd_available("bf16")
    fp32, _ = winograd_available("none")
    if bf16:
        return "winograd", True, "bf16 3x3 convs as Winograd F(2x2,3x3); --winograd off: direct"
    if fp32 and fp32_by_default():
        return "winograd", True, "fp32 3x3 convs as Winograd F(4x4,3x3); --winograd off: direct"
    if fp32:
        return "winograd", True, "fp32 with --winograd on (auto: direct convs here); " + why
    return "winograd", False, why


def malloc_row() -> tuple[str, bool, str]:
    """Whether freed host memory stays in the heap for the next step (fastcifar/heap.py)."""
    if heap.state() == "kept":
        return "malloc", True, "FASTCIFAR_MALLOC=kept: freed host memory kept for reuse (glibc)"
    if heap.requested() == "kept":
        return "malloc", False, "FASTCIFAR_MALLOC=kept needs glibc; the C library's policy runs"
    return "malloc", False, "FASTCIFAR_MALLOC=system: the C library's policy"


def triton_row() -> tuple[str, bool, str]:
    """Triton: its version, and where its kernels run (the fused block's TMA-fed
    convolution, FASTCIFAR_CONV_LOOP=tma, needs a Hopper GPU or later)."""
    ok, detail = _module("triton")
    if ok and not torch.cuda.is_available():
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        detail += "; no GPU: kernels run only under TRITON_INTERPRET=1" + (
            " (set)" if interpreted else ""
        )
    elif ok:
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        detail += "; TMA (FASTCIFAR_CONV_LOOP=tma): " + ("yes" if hopper else "no, before Hopper")
    return "triton", ok, detail

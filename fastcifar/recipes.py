"""Default recipes: the improved training settings per arch, and per-device speed settings.

`recipe(arch, device)` returns the config values that differ from `TrainConfig`'s
defaults. The speed settings (amp, compile, batch size) are the ones measured fastest on
each device; docs/PERFORMANCE.md gives the measurements.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastcifar.config import read_toml
from fastcifar.errors import UserError
from fastcifar.train.device import cpu_instructions, fastest_amp

# The paper's own hyper-parameters per arch, one TOML file each (`--config`).
PAPER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"

# Training recipes: SGD + Nesterov with a one-cycle schedule, label smoothing,
# crop + flip augmentation (plus an 8x8 cutout for cerberus); epochs chosen to reach the
# accuracy goals on this data (benchmarks/NOTES.md).
ARCH_RECIPES: dict[str, dict] = {
    "lenet": {"epochs": 20, "batch_size": 128, "lr": 0.05, "label_smoothing": 0.1},
    # the head's dropout cost conv3 a point under this augmentation (benchmarks/NOTES.md)
    "conv3": {"epochs": 20, "batch_size": 128, "lr": 0.05, "label_smoothing": 0.1, "dropout": 0.0},
    "conv5": {"epochs": 25, "batch_size": 256, "lr": 0.1, "label_smoothing": 0.1},
    "cerberus": {"epochs": 24, "batch_size": 256, "lr": 0.05, "label_smoothing": 0.1, "cutout": 8},
    # 35 epochs beat 30 (86.24% against 85.60%, benchmarks/NOTES.md)
    "wide4": {"epochs": 35, "batch_size": 256, "lr": 0.05, "label_smoothing": 0.1},
    # 14 plain convs, no normalisation: a 2-epoch one-cycle to 0.05 stayed at chance,
    # to 0.02 it reached 39.6% validation accuracy; 80 epochs beat 60, 40 and 20
    # (benchmarks/NOTES.md)
    "sinha14": {"epochs": 80, "batch_size": 256, "lr": 0.02, "label_smoothing": 0.1},
}
CONV4_RECIPE = {"epochs": 20, "batch_size": 256, "lr": 0.05, "label_smoothing": 0.1}

# Speed settings per device kind; per-arch entries override the device's defaults. On a
# CPU without bf16 instructions the CPU's bf16 becomes fp32 (`device.fastest_amp`). On
# CUDA the compiled step replays as a CUDA graph: CerberusNet's step at batch 256 is
# bound by kernel launches, and graphs ran it 2.28x faster on an H200 and trained the
# recipe to 88.63% (benchmarks/NOTES.md, "NVIDIA H200, fourth run").
DEVICE_RECIPES: dict[str, dict[str, dict]] = {
    "cpu": {"*": {"amp": "bf16", "channels_last": True, "compile": False}},
    "cuda": {
        "*": {
            "amp": "bf16",
            "channels_last": True,
            "compile": True,
            "compile_mode": "reduce-overhead",
        }
    },
}

# On a CPU with AMX the convolutions take less of a step than on one with AVX512-BF16
# alone, so the rest of the step counts for more. torch.compile's fusion of it pays for
# some archs: conv4_leaky trained 1.15x faster compiled, the only arch at or above the
# rule's 1.10x (benchmarks/NOTES.md, "The first CPU with AMX"). torch's fused SGD step
# (one kernel a parameter group, where the CPU's default is four or five tensor
# operations a parameter) trained lenet, conv5, wide4 and CerberusNet 1.01x, 1.04x, 1.07x
# and 1.00x faster (benchmarks/NOTES.md, "Small costs of CerberusNet's step").
AMX_CPU_RECIPES: dict[str, dict] = {
    "*": {"fused_optimizer": True},
    "conv4_leaky": {"compile": True},
}


def recipe(arch: str, device: str) -> dict:
    """Config values for `arch` on `device` ("cpu" or "cuda")."""
    values = dict(CONV4_RECIPE if arch.startswith("conv4") else ARCH_RECIPES.get(arch, {}))
    speed = DEVICE_RECIPES.get(device, DEVICE_RECIPES["cpu"])
    values.update(speed["*"])
    values.update(speed.get(arch, {}))
    if device == "cpu" and values.get("amp") == "bf16":
        values["amp"] = fastest_amp(torch.device("cpu"))
    if device == "cpu" and cpu_instructions() == "AMX":
        values.update(AMX_CPU_RECIPES["*"])
        values.update(AMX_CPU_RECIPES.get(arch, {}))
    return values


def paper_config(arch: str) -> Path:
    """The file of the paper's recipe for `arch`; a UserError where there is none."""
    path = PAPER_CONFIGS / f"{arch}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PAPER_CONFIGS.glob("*.toml")))
        raise UserError(f"no paper recipe for {arch} (there is one for: {known or 'none'})")
    return path


def named_recipe(arch: str, name: str, device: str) -> dict:
    """Config values of recipe `name` ("default" or "paper") for `arch` on `device`: the
    values `fastcifar train --arch ARCH` (with `--config` the paper's file) starts from."""
    values = recipe(arch, device)
    if name == "paper":
        values.update(read_toml(paper_config(arch)))
    return {**values, "arch": arch}

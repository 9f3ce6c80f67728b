"""Default recipes: the improved training settings per arch, and per-device speed settings.

`recipe(arch, device)` returns the config values that differ from `TrainConfig`'s
defaults. The speed settings (amp, compile, batch size) are the ones measured fastest on
each device; the README's performance section gives the measurements.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastcifar.config import read_toml
from fastcifar.errors import UserError
from fastcifar.train.device import native_bf16

# The paper's own hyper-parameters per arch, one TOML file each (`--config`).
PAPER_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"

# Training recipes: SGD + Nesterov with a one-cycle schedule, label smoothing,
# crop + flip augmentation (plus an 8x8 cutout for cerberus); epochs chosen to reach the
# accuracy goals on this data (benchmarks/NOTES.md).
ARCH_RECIPES: dict[str, dict] = {
    "lenet": {"epochs": 20, "batch_size": 128, "lr": 0.05, "label_smoothing": 0.1},
    "conv3": {"epochs": 20, "batch_size": 128, "lr": 0.05, "label_smoothing": 0.1},
    "conv5": {"epochs": 25, "batch_size": 256, "lr": 0.1, "label_smoothing": 0.1},
    "cerberus": {"epochs": 24, "batch_size": 256, "lr": 0.05, "label_smoothing": 0.1, "cutout": 8},
    "wide4": {"epochs": 30, "batch_size": 256, "lr": 0.05, "label_smoothing": 0.1},
    # 14 plain convs, no normalisation: a 2-epoch one-cycle to 0.05 stayed at chance,
    # to 0.02 it reached 39.6% validation accuracy; 40 epochs beat 20 (benchmarks/NOTES.md)
    "sinha14": {"epochs": 40, "batch_size": 256, "lr": 0.02, "label_smoothing": 0.1},
}
CONV4_RECIPE = {"epochs": 20, "batch_size": 256, "lr": 0.05, "label_smoothing": 0.1}

# Speed settings per device kind; per-arch entries override the device's defaults.
# "cpu" has bf16 instructions (AVX512-BF16 or AMX); "cpu-fp32" lacks them and would
# emulate bf16 several times slower than fp32 (`device.native_bf16`).
DEVICE_RECIPES: dict[str, dict[str, dict]] = {
    "cpu": {"*": {"amp": "bf16", "channels_last": True, "compile": False}},
    "cpu-fp32": {"*": {"amp": "none", "channels_last": True, "compile": False}},
    "cuda": {"*": {"amp": "bf16", "channels_last": True, "compile": True}},
}


def device_kind(device: str) -> str:
    """The DEVICE_RECIPES entry for `device` ("cpu" or "cuda") on this machine."""
    if device == "cpu" and not native_bf16(torch.device("cpu")):
        return "cpu-fp32"
    return device if device in DEVICE_RECIPES else "cpu"


def recipe(arch: str, device: str) -> dict:
    """Config values for `arch` on `device` ("cpu" or "cuda")."""
    values = dict(CONV4_RECIPE if arch.startswith("conv4") else ARCH_RECIPES.get(arch, {}))
    speed = DEVICE_RECIPES[device_kind(device)]
    values.update(speed["*"])
    values.update(speed.get(arch, {}))
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

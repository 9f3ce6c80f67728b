"""Checkpoints: written atomically, loaded with `weights_only=True`.

A checkpoint holds the model, optimiser, schedule and early-stopping state, the epoch it
ends, and the run's config, so `--resume` and `fastcifar eval` need nothing else.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from fastcifar.atomic import write_atomic
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError, first_line


def save_checkpoint(obj: dict, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def _written_by_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive holding a pickle (data.pkl) and a version record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/data.pkl") for n in names) and any(
        n.endswith("/version") for n in names
    )


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint dict; a one-line UserError for a missing, corrupt or foreign file."""
    if path.is_dir():
        path = path / "best.pt"
    if path.is_file() and not _written_by_torch_save(path):
        raise UserError(f"{path} is not a checkpoint (not a file torch.save wrote, or truncated)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        if (path.parent / "config.json").exists():  # a run directory, before its first epoch
            raise UserError(f"no {path.name} in {path.parent}: no epoch finished yet") from None
        raise UserError(f"checkpoint not found: {path}") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise UserError(f"cannot load checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a fastcifar checkpoint")
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict, arch: str, source: Path) -> None:
    """Load weights, with a one-line error when they belong to another architecture."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"checkpoint {source} does not fit arch {arch!r}") from None


def resumable(model, optimizer, schedule, scaler, state: dict, cfg: TrainConfig) -> dict:
    """What last.pt holds: everything `restore` needs to go on after `state["epoch"]`."""
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "state": state,
        "config": cfg.to_dict(),
        "epoch": state["epoch"],
    }
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def restore(ckpt: dict, model, optimizer, schedule, scaler, arch: str, path: Path) -> dict:
    """Loads a `resumable` checkpoint into the training objects; returns the run's state."""
    load_model_state(model, ckpt["model"], arch, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["state"]

"""Using a trained checkpoint: test-set evaluation and per-image prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastcifar.config import TrainConfig
from fastcifar.data.augment import prepare_images, to_nchw
from fastcifar.data.dataset import prepare_data
from fastcifar.data.loader import TensorLoader
from fastcifar.data.sources import CLASSES
from fastcifar.errors import UserError
from fastcifar.train.build import build_model, winograd_refusal
from fastcifar.train.checkpoint import load_checkpoint, load_model_state
from fastcifar.train.device import computes_in, fastest_amp, input_dtype, resolve_device
from fastcifar.train.evaluate import EvalResult, evaluate
from fastcifar.train.rundir import run_data


def load_trained(path: Path, device_name: str = "auto") -> tuple[torch.nn.Module, TrainConfig]:
    """The model of a checkpoint (or of a run directory's best.pt), ready for inference."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    device = resolve_device(device_name)
    if not computes_in(cfg.amp, device):  # the training precision is missing or emulated here
        cfg = cfg.replace(amp=fastest_amp(device))
    cfg = cfg.replace(device=device.type)
    if cfg.winograd == "on" and winograd_refusal(cfg, device):  # a speed switch: same weights
        cfg = cfg.replace(winograd="off")
    cfg = cfg.replace(
        winograd_weight_grad="off", winograd_grad_tile=2, winograd_input_grad_tile=2
    )  # training only
    model = build_model(cfg, device)
    load_model_state(model, ckpt["model"], cfg.arch, path)
    return model.eval(), cfg


def eval_checkpoint(
    path: Path, data: str | None, tta: bool, device_name: str = "auto", log=print
) -> EvalResult:
    model, cfg = load_trained(path, device_name)
    device = next(model.parameters()).device
    run = path if path.is_dir() else path.parent
    if not data and (run / "config.json").is_file():  # the checkpoint's run: its data, found
        data = run_data(run)  # from any working directory
    bundle = prepare_data(
        data or cfg.data, val=0, split_seed=0, subset=None, device=device, log=log
    )
    loader = TensorLoader(
        bundle.test.images, bundle.test.labels, cfg.eval_batch_size, train=False,
        dtype=input_dtype(cfg.amp),
    )  # fmt: skip
    return evaluate(model, loader, cfg.amp, device, tta=tta)


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (32, 32, 3), resized when it is another size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    if rgb.size != (32, 32):
        rgb = rgb.resize((32, 32), Image.BILINEAR)
    return np.asarray(rgb)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, with each folder replaced by the image files under it, sorted."""
    files = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        files.extend(found)
    return files


def predict_images(
    path: Path,
    images: list[Path],
    device_name: str = "auto",
    batch_size: int = 500,
    named: tuple[Path, ...] = (),
    log=print,
) -> list[tuple[Path, str, float]]:
    """(image, class name, probability) for each image, classified batch_size at a time.

    An image that cannot be read stops the command when the user named it (or `named` is
    empty); one found in a folder is left out, with a note, and the others classified.
    """
    model, cfg = load_trained(path, device_name)
    device = next(model.parameters()).device
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = []
        for image in images[start : start + batch_size]:
            try:
                chunk.append((image, read_image(image)))
            except UserError as exc:
                if not named or image in named:
                    raise
                log(f"{exc}; left out")
        if not chunk:
            continue
        batch = torch.from_numpy(np.stack([pixels for _, pixels in chunk])).to(device)
        with torch.inference_mode():
            logits = model(to_nchw(prepare_images(batch, 0, torch.float32))).float()
        probs, classes = logits.softmax(1).max(1)
        predictions += [
            (image, CLASSES[c], p)
            for (image, _), c, p in zip(chunk, classes.tolist(), probs.tolist(), strict=True)
        ]
    if not predictions:
        raise UserError("none of the images could be read")
    return predictions

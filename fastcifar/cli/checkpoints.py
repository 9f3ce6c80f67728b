"""`fastcifar eval` and `fastcifar predict`: a trained checkpoint on the test set or on
image files."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from fastcifar.cli.arguments import RUN_DATA_HELP
from fastcifar.config import DEVICES

CHECKPOINT_HELP = "a .pt file or a run directory (uses best.pt)"
DEVICE_HELP = "auto: CUDA when present"


def register(commands) -> None:
    ev = commands.add_parser("eval", help="test accuracy of a checkpoint")
    ev.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    ev.add_argument("--data", help=RUN_DATA_HELP)
    ev.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    ev.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    ev.set_defaults(handler=evaluate)

    pr = commands.add_parser("predict", help="classify image files")
    pr.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    pr.add_argument(
        "images", type=Path, nargs="+", help="image files, or folders to search for them"
    )
    pr.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    pr.set_defaults(handler=predict)


def evaluate(args) -> int:
    from rich.console import Console

    from fastcifar.inference import eval_checkpoint

    console = Console()
    result = eval_checkpoint(args.checkpoint, args.data, args.tta, args.device, log=console.print)
    tta = " (flip TTA)" if args.tta else ""
    console.print(
        f"test accuracy{tta}: {result.acc:.2%}  loss {result.loss:.4f}  ({len(result.labels)} images)"
    )
    return 0


def predict(args) -> int:
    from fastcifar.inference import image_files, predict_images

    images = image_files(args.images)
    named = tuple(args.images)
    note = functools.partial(print, file=sys.stderr)
    for image, name, prob in predict_images(
        args.checkpoint, images, args.device, named=named, log=note
    ):
        print(f"{image}\t{name}\t{prob:.4f}")
    return 0

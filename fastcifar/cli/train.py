"""`fastcifar train`: one flag per TrainConfig field, layered over recipes and config files."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

from fastcifar.cli.arguments import OneLineErrors
from fastcifar.config import TrainConfig, read_config, read_run_config
from fastcifar.errors import UserError

RESUME_OVERRIDES = {"data", "epochs", "device", "threads", "winograd", "winograd_weight_grad",
                    "winograd_grad_tile", "winograd_input_grad_tile"}  # fmt: skip
NOT_CONFIG = ("command", "handler", "parser", "argv", "config", "resume", "quiet", "print_config")


def register(commands) -> None:
    parser = commands.add_parser("train", help="train a model")
    add_train_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from fastcifar.display import TrainingDisplay
    from fastcifar.train.engine import fit

    cfg, resume = resolve_train_config(args)
    if args.print_config:  # with --resume: the run's settings, not its place (as --config RUN)
        print((cfg if resume is None else cfg.replace(out=None)).to_toml(), end="")
        return 0
    fit(cfg, TrainingDisplay(quiet=args.quiet), resume=resume)
    return 0


def train_config(flags: list[str]) -> tuple[TrainConfig, Path | None]:
    """The config (and run to resume) that `fastcifar train FLAGS...` would train."""
    parser = OneLineErrors(prog="fastcifar train")
    add_train_arguments(parser)
    return resolve_train_config(parser.parse_args(flags))


def _field_help() -> dict[str, str]:
    """Each config field's help text: its comment in config.py (one place for units)."""
    source = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE))


def _parser_for(type_name: str):
    base = type_name.replace(" | None", "")
    return {"int": int, "float": float, "str": str}[base]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so recipes can fill them."""
    helps = _field_help()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        text = helps.get(field.name, "")
        if field.name == "amp":
            parser.add_argument(
                "--amp", nargs="?", const="auto", choices=["auto", "bf16", "fp16", "none"],
                default=argparse.SUPPRESS,
                help="autocast dtype; bare --amp (auto) means bf16 where the device computes in"
                " bf16 (a GPU, a CPU with AVX512-BF16 or AMX), else fp32",
            )  # fmt: skip
            parser.add_argument(
                "--no-amp", dest="amp", action="store_const", const="none",
                default=argparse.SUPPRESS, help="train in fp32",
            )  # fmt: skip
        elif field.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            parser.add_argument(
                flag, type=_parser_for(field.type), default=argparse.SUPPRESS, help=text,
                metavar=field.name.upper(),
            )  # fmt: skip
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="TOML config file, or a run directory: that run's settings")  # fmt: skip
    parser.add_argument(
        "--resume", type=Path, default=argparse.SUPPRESS, help="continue the run in this directory"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as TOML (a --config file) and exit without training",
    )


def resolve_train_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """Layer defaults, the arch's device recipe, --config, then flags (later wins)."""
    from fastcifar.models import check_arch
    from fastcifar.recipes import recipe
    from fastcifar.train.device import resolve_device

    flags = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    resume = getattr(args, "resume", None)
    if resume is not None:
        if getattr(args, "config", None) is not None:
            raise UserError("--resume continues the saved config; it takes no --config")
        saved = resume / "config.json"
        if not saved.is_file():
            raise UserError(f"nothing to resume: {saved} not found")
        values = _found_data(read_run_config(saved), resume)
        _resolve_auto_amp(flags, resolve_device(flags.get("device") or values["device"]))
        cfg = TrainConfig.from_dict({**values, **flags})
        _check_unchanged(TrainConfig.from_dict(values), cfg, set(flags), resume)
        return cfg, resume
    config = getattr(args, "config", None)
    file_values = read_config(config) if config else {}
    if config and (config.is_dir() or config.name == "config.json"):  # a run's settings
        file_values = _found_data(file_values, config if config.is_dir() else config.parent)
    arch = check_arch(flags.get("arch") or file_values.get("arch") or TrainConfig.arch)
    device = resolve_device(flags.get("device") or file_values.get("device") or "auto")
    _resolve_auto_amp(flags, device)
    values = {**recipe(arch, device.type), **file_values, **flags, "arch": arch}
    return TrainConfig.from_dict(values), None


def _resolve_auto_amp(flags: dict, device) -> None:
    """A bare --amp ("auto") becomes the fastest autocast dtype on `device`."""
    from fastcifar.train.device import SLOW_BF16, fastest_amp

    if flags.get("amp") == "auto":
        flags["amp"] = fastest_amp(device)
        if flags["amp"] == "none":
            print(f"fastcifar: {SLOW_BF16}; --amp trains in fp32", file=sys.stderr)


def _check_unchanged(saved: TrainConfig, given: TrainConfig, names: set, run: Path) -> None:
    """Refuse flags (`names`) that would change a resumed run's settings (repeating them is
    fine): `given` is the run's config with the flags applied."""
    for name in sorted(names - RESUME_OVERRIDES):
        if name == "out" and given.out and Path(given.out).resolve() == run.resolve():
            continue  # the run's own directory, however it is spelled
        if getattr(given, name) != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"--resume continues the saved config; it cannot change {flag} "
                f"({getattr(saved, name)} in {run}, not {getattr(given, name)})"
            )


def _found_data(values: dict, run: Path) -> dict:
    """A run's saved values, with its --data found from any working directory."""
    from fastcifar.train.rundir import run_data

    return {**values, "data": run_data(run)} if values.get("data") else values

"""The `fastcifar` command line: train, evaluate, sweep, analyse and benchmark CIFAR-10 CNNs.

Each command's flags and handler live in one module of this package; `build_parser` joins
them. User mistakes end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from fastcifar import __version__, heap
from fastcifar.cli import checkpoints, machine, measure, runs, sweep, train
from fastcifar.cli.arguments import OneLineErrors, remember_parsers
from fastcifar.cli.train import resolve_train_config
from fastcifar.errors import NothingToResume, UserError, is_out_of_memory, out_of_memory_line
from fastcifar.interrupts import stop_signals_as_interrupt

__all__ = ["build_parser", "main", "resolve_train_config"]

COMMAND_MODULES = (train, checkpoints, machine, measure, runs, sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="fastcifar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastcifar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    remember_parsers(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        heap.keep_freed_memory()  # FASTCIFAR_MALLOC, before the first tensor
        with stop_signals_as_interrupt():
            args = build_parser().parse_args(argv)
            args.argv = sys.argv[1:] if argv is None else list(argv)  # for records of the command
            return args.handler(args)
    except UserError as exc:
        print(f"fastcifar: error: {exc}", file=sys.stderr)
        return 2
    except NothingToResume as exc:
        print(f"fastcifar: {exc}", file=sys.stderr)
        return 0
    except BrokenPipeError:  # `fastcifar ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush stays quiet
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except OSError as exc:  # a path that cannot be read or written, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fastcifar: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastcifar: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"fastcifar: error: {out_of_memory_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

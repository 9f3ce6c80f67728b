"""What every command's parser shares: one-line usage errors and argument types."""

from __future__ import annotations

import argparse
import difflib
import os
import re
from pathlib import Path

from fastcifar.config import parse_setting
from fastcifar.errors import UserError


class OneLineErrors(argparse.ArgumentParser):
    """A usage mistake (a missing value, an unknown choice) ends like any other user
    error, in one line, not in a usage dump."""

    def error(self, message):
        command = self.prog.removeprefix("fastcifar").strip()
        where = f"{command}: " if command else ""
        raise UserError(f"{where}{self._plain(message)} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """Unknown options are reported by the (sub)command they were given to, with the
        nearest option it has."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            owner = getattr(parsed, "parser", self)
            owner.error(f"unrecognized arguments: {' '.join(unknown)}{owner._nearest(unknown)}")
        return parsed

    def _nearest(self, unknown: list[str]) -> str:
        names = [o[2:] for o in self._option_string_actions if o.startswith("--")]
        for word in unknown:
            if word.startswith("--"):
                near = difflib.get_close_matches(word[2:].split("=")[0], names, n=1)
                if near:
                    return f"; did you mean --{near[0]}?"
        return ""

    def _plain(self, message: str) -> str:
        """Says what to type instead: a missing command lists the choices, a mistyped
        one names the nearest."""
        for action in self._subparsers._group_actions if self._subparsers else ():
            if message.endswith(f"required: {action.dest}"):
                return f"no {action.dest} given; choose one of: {', '.join(action.choices)}"
            typo = re.search(r"invalid choice: '([^']*)'", message)
            near = typo and difflib.get_close_matches(typo[1], list(action.choices), n=1)
            if near:
                return f"unknown {action.dest} '{typo[1]}'; did you mean '{near[0]}'?"
        return message


def remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser is stored in the arguments it parses, so that an
    unknown option is reported by the command it was given to."""
    parser.set_defaults(parser=parser)
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for child in action.choices.values():
            remember_parsers(child)


def setting(text: str) -> tuple[str, object]:
    """`--set KEY=VALUE`, a usage error when KEY or VALUE does not fit the config."""
    try:
        return parse_setting(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def arch_name(text: str) -> str:
    """An `--arch` value, checked as the command line is read: a typo in the last of
    several architectures is refused before the first one is measured or trained."""
    from fastcifar.models import check_arch

    try:
        return check_arch(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def figure_path(text: str) -> Path:
    """A figure file's path, checked as the command line is read: its suffix names a
    format matplotlib writes."""
    from fastcifar.figures import figure_format

    figure_format(Path(text))
    return Path(text)


def recipe_label(text: str) -> str:
    """A `--label` for recorded runs: letters, digits and `.`, `_`, `-`, as recipe names."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '.', '_' and '-' (e.g. default-direct)"
        )
    return text


def results_file(text: str) -> Path:
    """A file a command writes when its work is done, checked as the command line is
    read: a mistyped folder is refused before minutes of measuring, not after."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {folder} to write {path.name} into")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} is not writable")
    return path


DATA_HELP = "CIFAR-10 source (default: $FASTCIFAR_DATA, then the cache)"
RUN_DATA_HELP = "CIFAR-10 source (default: the one the run trained on)"

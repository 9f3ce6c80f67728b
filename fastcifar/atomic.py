"""Atomic file writes: write beside the target, fsync, rename over it. A reader sees the
old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fastcifar.interrupts import interrupts_deferred


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Ctrl-C or SIGTERM during the write takes effect once the file is in place."""
    with interrupts_deferred():
        _write_atomic(path, write)


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:  # name the target, not the temporary file
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:  # a folder in the way: name the target, not the temporary file
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def replace_folder(built: Path, target: Path) -> None:
    """Move the finished folder `built` to `target`, removing an older `target` first. A
    stop signal waits until the new folder is in place, so neither is lost between."""
    with interrupts_deferred():
        if target.exists():
            shutil.rmtree(target)
        os.replace(built, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""

import sys


class UserError(Exception):
    """Bad input (arguments, data, checkpoints, paths). Shown without a traceback."""


class NothingToResume(Exception):
    """`--resume` of a run that already finished: said in one line, exit status 0."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error: the settings ask for more memory than the device has."""
    torch = sys.modules.get("torch")  # not imported for this alone
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def out_of_memory_line(exc: BaseException) -> str:
    """torch's out-of-memory message cut to what happened ("CUDA out of memory. Tried to
    allocate 2.00 GiB"), and what to change."""
    what = ". ".join(first_line(exc).split(". ")[:2]).rstrip(".")
    return f"{what}: a smaller --batch-size needs less memory"

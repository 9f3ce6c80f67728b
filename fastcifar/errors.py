"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""

import re
import sys


class UserError(Exception):
    """Bad input (arguments, data, checkpoints, paths). Shown without a traceback."""


class NothingToResume(Exception):
    """`--resume` of a run that already finished: said in one line, exit status 0."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The CPU allocator's failure is a plain RuntimeError; only its message says what it is.
CPU_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: (can't allocate|not enough) memory[^.]*")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, on a GPU or the CPU: the settings ask for more memory
    than the device has."""
    torch = sys.modules.get("torch")  # not imported for this alone
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and CPU_OUT_OF_MEMORY.search(str(exc)) is not None


def out_of_memory_line(exc: BaseException) -> str:
    """torch's out-of-memory message cut to what happened ("CUDA out of memory. Tried to
    allocate 2.00 GiB"), and what to change."""
    text = first_line(exc)
    cpu = CPU_OUT_OF_MEMORY.search(text)
    what = cpu.group(0) if cpu else ". ".join(text.split(". ")[:2])
    return f"{what.rstrip('.')}: a smaller --batch-size needs less memory"


def settings_error_line(exc: BaseException) -> str:
    """The line that says why a run's own settings failed (a UserError, or out of memory)."""
    return out_of_memory_line(exc) if is_out_of_memory(exc) else first_line(exc)

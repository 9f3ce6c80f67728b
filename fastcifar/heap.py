"""Host memory kept for reuse from one training step to the next (`FASTCIFAR_MALLOC`).

glibc's malloc serves large blocks (above a threshold of 128 KiB that rises to at most
32 MiB) with fresh `mmap`s, returns them to the kernel when they are freed, and trims
its heap's free top the same way. A step frees and allocates the same activations every
time, so on the CPU every step of a large model, and every evaluation batch, faults its
memory in again page by page. Under `FASTCIFAR_MALLOC=kept`, the default,
`keep_freed_memory` tells glibc (`mallopt`) to serve every block from its heap and never
to trim it: the memory is faulted in once and reused, for a larger peak (a few spare
copies of the largest blocks: an aligned block does not always fit the hole a freed one
left). `system` leaves the C library's policy; benchmarks/NOTES.md has the measurements.
"""

from __future__ import annotations

import ctypes
import os

from fastcifar.errors import UserError

POLICIES = ("system", "kept")
DEFAULT = "kept"
M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's <malloc.h>
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes of free heap top before glibc trims it (an int parameter)

_state = "system"


def requested() -> str:
    """The policy `FASTCIFAR_MALLOC` asks for (DEFAULT when unset)."""
    policy = os.environ.get("FASTCIFAR_MALLOC", DEFAULT)
    if policy not in POLICIES:
        raise UserError(f"FASTCIFAR_MALLOC={policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def keep_freed_memory() -> str:
    """Apply `FASTCIFAR_MALLOC` to this process, before its first large tensor: "kept"
    takes effect where the C library is glibc. Returns `state()`."""
    global _state
    libc = _glibc() if _state == "system" and requested() == "kept" else None
    if (
        libc is not None
        and libc.mallopt(M_MMAP_MAX, 0) == 1
        and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    ):
        _state = "kept"
    return _state


def state() -> str:
    """Whether freed memory is "kept" (`keep_freed_memory` took effect) or the C
    library's own "system" policy rules this process."""
    return _state


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc: only glibc's mallopt takes these
    parameters (macOS has none; musl's ignores them)."""
    libc = ctypes.CDLL(None) if os.name == "posix" else None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None

"""Ctrl-C and SIGTERM: both end a command with KeyboardInterrupt, but never inside a write.

A KeyboardInterrupt raised while torch.save is inside its C++ writer comes out as a
RuntimeError ("unexpected pos ..."), and one raised between two files of an epoch's record
leaves them disagreeing. Inside `interrupts_deferred()` a stop signal is noted and raised
when the block ends, so every file is written whole and a run stops between epochs' records.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_depth = 0  # how many `interrupts_deferred` blocks the main thread is inside
_pending = False  # a stop signal came while deferred


def _interrupt(signum, frame):
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_as_interrupt():
    """Route Ctrl-C and SIGTERM (a job scheduler, `kill`) to KeyboardInterrupt, deferred
    inside writes: a training run keeps its last finished epoch's checkpoint and its MLflow
    run is marked KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a stop signal that arrives inside the block until the block has ended. (Signal
    handlers run in the main thread; a block in another thread defers nothing.)"""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    except BaseException:
        if _depth == 1:
            _pending = False  # the block's own exception ends the command already
        raise
    finally:
        _depth -= 1
    if _depth == 0 and _pending:
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_allowed():
    """Inside `interrupts_deferred`, let stop signals through again for this block (a stop
    held until now is raised as it begins); the outer block defers again after it."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _depth = _depth, 0
    try:
        if _pending:
            _pending = False
            raise KeyboardInterrupt
        yield
    finally:
        _depth = outer


def stop_with_parent(parent: int) -> None:
    """Send this process SIGTERM when `parent` exits, however it ends (Linux: even when
    killed with SIGKILL, which it cannot pass on), and at once if it has already gone:
    a worker never trains on, unseen, for a command that is no longer there."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)

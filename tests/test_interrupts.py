"""Ctrl-C and SIGTERM stop a command between files, never inside one."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from fastcifar.atomic import write_atomic
from fastcifar.interrupts import (
    interrupts_allowed,
    interrupts_deferred,
    stop_signals_as_interrupt,
)
from fastcifar.train.checkpoint import load_checkpoint


class SignalsMidWrite:
    """A file that sends this process `signum` during torch.save's third write, from inside
    torch's C++ zip writer."""

    def __init__(self, f, signum):
        self.f, self.signum, self.writes = f, signum, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), self.signum)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_inside_torch_save_waits_for_the_checkpoint(tmp_path, signum):
    ckpt = {"model": {"w": torch.arange(10_000.0)}, "config": {"arch": "lenet"}}
    path = tmp_path / "last.pt"
    writer = None

    def save(f):
        nonlocal writer
        writer = SignalsMidWrite(f, signum)
        torch.save(ckpt, writer)

    # Raised inside torch's writer, the interrupt came out as RuntimeError("unexpected pos")
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
        write_atomic(path, save)
    assert writer.writes > 3  # the signal came mid-write and the write went on
    assert torch.equal(load_checkpoint(path)["model"]["w"], ckpt["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_outside_a_deferred_block_a_stop_signal_interrupts_at_once():
    reached = []
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after")
    assert reached == []


def test_nested_blocks_hold_the_signal_until_the_outermost_ends():
    reached = []
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("inner")
            reached.append("outer")
        reached.append("after")
    assert reached == ["inner", "outer"]


def test_an_error_inside_the_block_wins_and_the_held_signal_is_spent():
    with stop_signals_as_interrupt():
        with pytest.raises(ValueError), interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError("the block's own failure")
        with interrupts_deferred():  # a later block is not interrupted by the spent signal
            pass


def test_an_allowed_block_inside_a_deferred_one_is_interrupted_at_once():
    reached = []
    with (
        stop_signals_as_interrupt(),
        pytest.raises(KeyboardInterrupt),
        interrupts_deferred(),
        interrupts_allowed(),
    ):
        with interrupts_deferred():  # deferring inside the allowed block still holds it
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("write")
        reached.append("after the write")
    assert reached == ["write"]


def test_a_signal_held_before_an_allowed_block_is_raised_as_it_begins():
    reached = []
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("held")
        with interrupts_allowed():
            reached.append("allowed")
    assert reached == ["held"]


def test_after_an_allowed_block_the_outer_block_defers_again():
    reached = []
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt), interrupts_deferred():
        with interrupts_allowed():
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("held")
    assert reached == ["held"]


def test_the_previous_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_stop_signal_while_a_folder_is_replaced_waits_for_the_new_one(tmp_path, monkeypatch):
    import shutil

    from fastcifar.atomic import replace_folder

    old, new = tmp_path / "analysis", tmp_path / ".building"
    old.mkdir()
    (old / "index.html").write_text("old")
    new.mkdir()
    (new / "index.html").write_text("new")
    rmtree = shutil.rmtree

    def rmtree_then_signal(path, *args, **kwargs):
        rmtree(path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the old folder gone, the new one not yet in

    monkeypatch.setattr(shutil, "rmtree", rmtree_then_signal)
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
        replace_folder(new, old)
    assert (old / "index.html").read_text() == "new" and not new.exists()


def test_a_worker_whose_parent_has_already_gone_stops_at_once():
    """`stop_with_parent` from a process whose parent is not the one named (it died before
    the worker got going) sends the stop signal at once; with its real parent it goes on."""
    code = ("import os, sys, time; from fastcifar.interrupts import stop_with_parent; "
            "stop_with_parent(os.getppid() + int(sys.argv[1])); time.sleep(0.5)")  # fmt: skip
    for offset, returncode in ((0, 0), (1_000_000, -signal.SIGTERM)):
        proc = subprocess.run([sys.executable, "-c", code, str(offset)], timeout=60)
        assert proc.returncode == returncode

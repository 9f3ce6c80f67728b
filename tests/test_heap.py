"""fastcifar/heap.py: with FASTCIFAR_MALLOC=kept, freed host memory stays in the heap, so
a step's memory is faulted in once. Each case runs in a fresh interpreter: the setting is
process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastcifar import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="mallopt's parameters are glibc's")

# allocate, touch and free a 48 MiB tensor (above glibc's largest mmap threshold) again
# and again; once the heap has settled (a few rounds: an aligned block does not always fit
# the hole a freed one left), the page faults of the next ten tell whether freed memory
# came back
CHILD = """
import json, resource, torch
from fastcifar import heap
state = heap.keep_freed_memory()
for _ in range(20):
    torch.ones(12 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(12 * 2**20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"state": state, "faults": faults}))
"""


def _child(policy: str) -> dict:
    env = {**os.environ, "FASTCIFAR_MALLOC": policy}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return json.loads(out.stdout)


def test_kept_memory_is_not_faulted_in_again():
    kept = _child("kept")
    system = _child("system")
    assert kept["state"] == "kept" and system["state"] == "system"
    pages = 10 * 48 * 2**20 // 4096
    assert system["faults"] > pages // 2  # every allocation maps fresh pages
    assert kept["faults"] < pages // 20


def _fastcifar(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "FASTCIFAR_MALLOC"}
    return subprocess.run([sys.executable, "-m", "fastcifar", *args], capture_output=True,
                          text=True, env={**environment, **env})  # fmt: skip


def test_the_command_line_applies_fastcifar_malloc():
    kept = _fastcifar("doctor", FASTCIFAR_MALLOC="kept").stdout
    unset = _fastcifar("doctor").stdout
    assert "malloc     yes  FASTCIFAR_MALLOC=kept" in kept
    assert ("malloc     yes" in unset) == (heap.DEFAULT == "kept")


def test_an_unknown_policy_is_one_line_and_exit_2():
    out = _fastcifar("doctor", FASTCIFAR_MALLOC="jemalloc")
    assert out.returncode == 2
    assert out.stderr == (
        "fastcifar: error: FASTCIFAR_MALLOC='jemalloc': expected one of system, kept\n"
    )

"""The callback that keeps a long run's memory flat (``run/freed_memory.py``) really hands freed heap memory
back to the system. Checked on the C heap directly, with resident memory read from ``/proc``: a run's own
memory over many epochs is a benchmark (docs/speed.md, row 6), not a test."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import pytest

from finetune_ablation.run.freed_memory import ReturnFreedMemory

BLOCK = 64 * 1024  # below glibc's mmap threshold (128 KiB): served from the heap, not mapped on its own
BLOCKS = 2000  # 125 MiB, all freed but one


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's; elsewhere the callback does nothing"
)
def test_heap_memory_freed_during_an_epoch_is_returned_at_its_end():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # touched, so resident
    pin = max(blocks)  # kept: below it, freed blocks cannot shrink the heap from its top by themselves
    for block in blocks:
        if block != pin:
            libc.free(block)
    freed_but_kept = _resident_mib()
    ReturnFreedMemory().on_epoch_end(0)
    returned = freed_but_kept - _resident_mib()
    libc.free(pin)
    assert returned > 0.8 * BLOCKS * BLOCK / 2**20, f"only {returned:.1f} MiB of 125 MiB freed went back"

"""Resident memory read at the end of every epoch, shared by benchmarks/memory_per_epoch.py (the suite) and
benchmarks/plain_keras.py (the baseline), so both sides of row 6 measure the same way."""

from __future__ import annotations

import os

import keras


def resident_mib() -> float:
    """This process's resident set size now (``/proc/self/statm``; not its peak)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class ResidentPerEpoch(keras.callbacks.Callback):
    """Appends the resident set size (MiB) at the end of each epoch to ``sizes``."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.sizes.append(round(resident_mib(), 1))

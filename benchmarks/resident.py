"""Resident memory read at the end of every epoch, shared by benchmarks/memory_per_epoch.py (the suite) and
benchmarks/plain_keras.py (the baseline), so both sides of row 6 measure the same way; and when each epoch
of the plain script ended (row 7's seconds per epoch)."""

from __future__ import annotations

import os
import time

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


class EpochEnds(keras.callbacks.Callback):
    """Appends the seconds since ``started`` (a ``time.perf_counter`` value) and the process's CPU seconds
    (``time.process_time``: all threads) at the end of each epoch."""

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started = started
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(round(time.perf_counter() - self.started, 3))
        self.cpu_seconds.append(round(time.process_time(), 3))

"""Give memory that TensorFlow freed back to the system at the end of every epoch, so a long run stays flat.

Without it a run's resident memory grows every epoch, and so does the plain Keras script's (measured side
by side in docs/speed.md, row 6): glibc's malloc keeps freed tensor buffers in its arenas instead of
returning them. ``malloc_trim(0)`` hands every arena's free pages back; it changes no computation. Where
the C library has no ``malloc_trim`` (macOS, musl) this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import keras


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class ReturnFreedMemory(keras.callbacks.Callback):
    """Calls ``malloc_trim(0)`` after every epoch: place it after the callbacks whose memory it should return."""

    def __init__(self) -> None:
        super().__init__()
        self._trim = _malloc_trim()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._trim is not None:
            self._trim(0)

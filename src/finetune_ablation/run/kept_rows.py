"""What a run computes once and reads every epoch (the decoded pixels, the frozen inputs): kept in memory,
in a scratch file on local disk, or not kept (recomputed at every read). docs/caches.md, "Large folders".

One decision per thing kept (``place``): in memory while it fits its budget (a ``cache`` key), else in a
scratch file while the disk keeps ``cache.scratch_keep_free_mib`` free after it, else recomputed. A kept
table is read back by row index (``KeptRows.read``): the training pipeline shuffles the row *indices* with
the very shuffle it used to apply to the rows, and gathers each batch's rows. That gives the same batches
in the same orders as before, bit for bit, and memory bounded by a few batches whatever the folder's size
(a shuffle buffer of the rows themselves holds the whole split: docs/speed.md, "Large folders").

A scratch file is created already unlinked (``tempfile.TemporaryFile``) and its space is reserved up front
(``posix_fallocate``): a full disk shows at once, as an ``OSError`` the caller turns into "recomputed"
with a warning, and the file's space returns to the disk when the run ends, however it ends (a killed
process included). Nothing is ever read back by another run, so nothing can be read half-written. Its
pages are read with ``pread`` (the kernel's page cache, which it reclaims under memory pressure, rather
than this process's resident memory)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from ..config import CacheConfig

log = logging.getLogger(__name__)

Where = Literal["memory", "disk", "recomputed"]
MIB = 2**20


@dataclass(frozen=True)
class Storage:
    """The ``cache`` keys that decide where a run keeps what it computes once (``conf/cache/default.yaml``)."""

    pixels_memory_bytes: int
    frozen_inputs_memory_bytes: int
    scratch_dir: Path
    keep_free_bytes: int

    @classmethod
    def from_config(cls, cache: Any = None) -> Storage:
        """From the ``cache`` config group (a ``CacheConfig`` or its composed ``DictConfig``); None: the defaults."""
        cache = cache if cache is not None else CacheConfig()
        scratch = Path(cache.scratch_dir).expanduser() if cache.scratch_dir else Path(tempfile.gettempdir())
        return cls(
            pixels_memory_bytes=int(cache.pixels_memory_mib) * MIB,
            frozen_inputs_memory_bytes=int(cache.frozen_inputs_memory_mib) * MIB,
            scratch_dir=scratch,
            keep_free_bytes=int(cache.scratch_keep_free_mib) * MIB,
        )


@dataclass(frozen=True)
class Placement:
    """Where one table is kept, and why: the value of its ``storage.*`` tag is ``<where>: <why>``."""

    where: Where
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"

    def fell_back(self, what: str, why: str) -> Placement:
        """Recomputed after all: its scratch file could not be reserved or written (said as a warning)."""
        log.warning("%s: %s, so they are recomputed at every read instead", what, why)
        return Placement("recomputed", f"{self.reason}; but {why}")


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / MIB:.1f} MiB"


def place(nbytes: int, budget: int, budget_key: str, storage: Storage) -> Placement:
    """Memory while ``nbytes`` fits ``budget`` (config key ``budget_key``); else a scratch file while the disk
    keeps ``storage.keep_free_bytes`` free after it; else recomputed at every read."""
    size, limit = size_text(nbytes), f"{budget_key}={budget // MIB}"
    if nbytes <= budget:
        return Placement("memory", f"{size}, within {limit}")
    folder = storage.scratch_dir
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return Placement(
            "recomputed", f"{size}, over {limit}, and the scratch folder {folder} is unusable ({why(exc)})"
        )
    if nbytes + storage.keep_free_bytes > free:
        return Placement(
            "recomputed",
            f"{size}, over {limit}, and {folder} has {size_text(free)} free: less than that plus "
            f"cache.scratch_keep_free_mib={storage.keep_free_bytes // MIB}",
        )
    return Placement("disk", f"{size}, over {limit}: a scratch file in {folder}")


def why(exc: OSError) -> str:
    """An OS error in a few words (``No space left on device``)."""
    return exc.strerror or str(exc)


_SAID = {"memory": "kept in memory", "disk": "kept on disk", "recomputed": "recomputed at every read"}


def announce(what: str, placement: Placement) -> None:
    """Say a decision once on the console. Kept in memory is the quiet default; on disk (space) or
    recomputed (time) is news."""
    if placement.where != "memory":
        log.info("%s %s: %s", what, _SAID[placement.where], placement.reason)


class KeptRows:
    """``count`` rows of float32 columns (``shapes``, one or more tensors per row) in memory or in a
    scratch file, written in order and read by index. Raises ``OSError`` when a scratch file cannot be
    reserved or written (the caller recomputes instead)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], count: int, where: Where, directory: Path):
        assert where in ("memory", "disk"), where
        self.shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self.count = count
        self._widths = [4 * math.prod(shape) for shape in self.shapes]
        self.row_bytes = sum(self._widths)
        self._arrays: list[np.ndarray] | None = None
        self._file = None
        if where == "memory":
            self._arrays = [np.empty((count, *shape), np.float32) for shape in self.shapes]
            return
        # unlinked at once: its space returns to the disk when it is closed or the process ends, however
        self._file = tempfile.TemporaryFile(dir=directory, prefix="finetune-ablation-scratch-")  # noqa: SIM115
        try:
            if count:
                os.posix_fallocate(self._file.fileno(), 0, count * self.row_bytes)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Give the rows back (memory, or the file's space on disk) now rather than when collected."""
        if self._file is not None:
            self._file.close()
        self._file = None
        self._arrays = None

    def write(self, start: int, columns: Sequence[np.ndarray]) -> None:
        """Rows ``start`` to ``start + len(columns[0])``, one array per column."""
        n = len(columns[0])
        if self._arrays is not None:
            for array, column in zip(self._arrays, columns, strict=True):
                array[start : start + n] = column
            return
        rows = np.concatenate(
            [np.ascontiguousarray(c, np.float32).reshape(n, -1).view(np.uint8) for c in columns], axis=1
        )
        view, offset = memoryview(rows).cast("B"), start * self.row_bytes
        while view:
            written = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        """The rows at ``indices`` (any order), one array per column."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if self._arrays is not None:
            return [array[indices] for array in self._arrays]
        out = [np.empty((len(indices), *shape), np.float32) for shape in self.shapes]
        views = [memoryview(array).cast("B") for array in out]
        fd = self._file.fileno()
        for k, index in enumerate(indices):
            buffers = [view[k * width : (k + 1) * width] for view, width in zip(views, self._widths, strict=True)]
            got = os.preadv(fd, buffers, int(index) * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"scratch file: read {got} of {self.row_bytes} bytes of row {index}")
        return out

    def read_range(self, start: int, stop: int) -> list[np.ndarray]:
        """Rows ``start`` to ``stop`` (one contiguous read from a scratch file)."""
        if self._arrays is not None:
            return [array[start:stop] for array in self._arrays]
        n = stop - start
        rows = np.empty((n, self.row_bytes), np.uint8)
        view, offset, done = memoryview(rows).cast("B"), start * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"scratch file: rows {start}-{stop} end early")
            done += got
        out, at = [], 0
        for shape, width in zip(self.shapes, self._widths, strict=True):
            out.append(np.ascontiguousarray(rows[:, at : at + width]).view(np.float32).reshape(n, *shape))
            at += width
        return out

    def gather(self, indices: tf.Tensor) -> list[tf.Tensor]:
        """``read`` inside a tf.data map: one batch of indices -> one tensor per column."""
        columns = tf.numpy_function(self.read, [indices], Tout=[tf.float32] * len(self.shapes))
        for column, shape in zip(columns, self.shapes, strict=True):
            column.set_shape((None, *shape))
        return list(columns)

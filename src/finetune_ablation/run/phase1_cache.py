"""Never train the same phase 1 twice (config group ``cache``).

Phase 1 (frozen base, head training) depends on the data, the seed, the base, augmentation, dropout,
the BN settings, batch size, base LR and initial epochs, not on anything of phase 2. Its end state
(every model variable: weights, BN statistics, random-seed states), its per-epoch rows and its phase
metrics are stored content-addressed by a hash of every config key except those the schema marks
``phase2``, ``recording`` or ``display`` (config.Role: a key added tomorrow is in the key unless
declared otherwise), with the images and a weights file hashed by content, plus the code and package
versions. A file lock per entry makes parallel jobs compute each entry once. Entries heal: a bad one
(truncated, changed, half-written) is detected by its checksums and recomputed, and what killed
writers leave behind is cleaned up (``Phase1Cache``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from ..config import CacheConfig, Role, schema_of, without_roles
from ..fingerprints import code_sha256, file_sha256, weights_file
from ..gap.layers import assign_values, copy_values
from ..paths import MLRUNS_DIR
from ..record import MAX_TAG_LENGTH, PHASE1_CACHE_WARNING_TAG
from ..tracking import package_versions

log = logging.getLogger("finetune_ablation")


@dataclass
class Phase1State:
    paths: list[str]  # variable paths, in model.variables order
    values: list[np.ndarray]
    rows: list[dict]  # per-epoch rows, as logged
    metrics: dict[str, float]  # phase1/* metrics
    report: str  # trainable_weights_phase1.txt

    @classmethod
    def capture(cls, model: keras.Model, rows: list[dict], metrics: dict[str, float], report: str) -> Phase1State:
        return cls([v.path for v in model.variables], copy_values(model.variables), rows, metrics, report)

    def restore(self, model: keras.Model) -> None:
        variables = model.variables
        if [v.path for v in variables] != self.paths:
            raise ValueError("cached phase-1 state does not fit this model")
        assign_values(variables, self.values)


def cache_dir(cfg: CacheConfig) -> Path:
    return Path(cfg.dir).expanduser() if cfg.dir else MLRUNS_DIR / "cache"


# Never in the phase-1 key: phase 2's own settings, where and how runs are recorded, and where the images
# are (their content is: ``data_fingerprint``).
NOT_IN_PHASE1_KEY = frozenset({Role.phase2, Role.recording, Role.display, Role.data_source})


def phase1_key(cfg: DictConfig, data_fingerprint: str) -> str:
    """Hash of everything phase 1 may depend on: every config key not classified as outside it."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    inputs = without_roles(container, NOT_IN_PHASE1_KEY, schema_of(cfg))
    path = weights_file(cfg.model.weights)  # demo: the base shipped with the package (demo_base.py)
    if path is not None:
        inputs["model"]["weights"] = f"file:{file_sha256(path)}"
    inputs["data"]["fingerprint"] = data_fingerprint
    inputs["versions"] = package_versions()
    inputs["code"] = code_sha256()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


CHECKSUMS = "checksums.json"  # written last: an entry without it, or not matching it, is recomputed
_PARTIAL = ".partial-"  # <key>.partial-<pid>: an entry being written; renamed to <key> when whole


class BadEntry(Exception):
    """A cache entry that cannot be trusted (truncated, changed, or left half-written)."""


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened and synced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Phase1Cache:
    """Entries are folders ``<dir>/phase1/<key>/`` written whole (rename), read under a per-entry lock.

    Healing: every entry ends with ``checksums.json`` (SHA-256 of its files, written last); an entry
    that lacks it or does not match it is removed and recomputed, and the run is tagged
    ``phase1_cache_warning``. A writer holds the entry's lock from start to rename, so a
    ``<key>.partial-<pid>`` folder or a ``<key>.lock`` file whose lock is free was left by a killed
    process (the kernel releases a dead process's lock): both are removed."""

    def __init__(self, directory: Path):
        self.root = directory / "phase1"
        self._held: set[str] = set()

    def _lock(self, key: str) -> FileLock:
        return FileLock(str(self.root / f"{key}.lock"))

    def _remove_leftovers(self, key: str) -> None:
        """Half-written folders of ``key``; the caller holds its lock, so no live writer owns them."""
        for partial in self.root.glob(f"{key}{_PARTIAL}*"):
            log.warning("phase-1 cache: removing %s, left half-written by a killed process", partial.name)
            shutil.rmtree(partial, ignore_errors=True)

    def clean(self) -> None:
        """Remove what killed writers left under the cache: half-written entries and free lock files.
        A lock held by a live process is skipped (never waited for)."""
        if not self.root.is_dir():
            return
        keys = {p.name.split(_PARTIAL)[0] for p in self.root.glob(f"*{_PARTIAL}*")}
        keys |= {p.name[: -len(".lock")] for p in self.root.glob("*.lock")}
        for key in sorted(keys - self._held):
            lock = self._lock(key)
            try:
                lock.acquire(blocking=False)
            except Timeout:
                continue  # a live writer
            try:
                self._remove_leftovers(key)
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f"{key}.lock").unlink()
            finally:
                lock.release()

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold the entry: a second job with the same key waits, then finds the entry computed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean()
        lock = self._lock(key)
        with lock:
            self._held.add(key)
            try:
                self._remove_leftovers(key)  # only a killed writer leaves a partial of a key it locked
                yield
            finally:  # unlinked while held: a waiter that opened this inode re-opens the path (filelock)
                self._held.discard(key)
                with contextlib.suppress(FileNotFoundError):
                    (self.root / f"{key}.lock").unlink()

    def load(self, key: str) -> Phase1State | None:
        """The entry, verified against its checksums; None when absent or bad (a bad one is removed,
        reported on the active run, and recomputed by the caller)."""
        entry = self.root / key
        if not entry.exists():
            return None
        try:
            return self._read_verified(entry)
        except BadEntry as exc:
            reason = str(exc)
        except Exception as exc:  # a verified entry that still does not parse
            reason = f"{type(exc).__name__}: {exc}"
        message = f"phase-1 cache entry {key} was bad ({reason}): removed and recomputed"
        log.warning(message)
        if mlflow.active_run() is not None:
            mlflow.set_tag(PHASE1_CACHE_WARNING_TAG, message[:MAX_TAG_LENGTH])
        shutil.rmtree(entry, ignore_errors=True)
        return None

    @staticmethod
    def _read_verified(entry: Path) -> Phase1State:
        try:
            expected = json.loads((entry / CHECKSUMS).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BadEntry(f"no valid {CHECKSUMS}: left by an interrupted or older writer") from None
        for name, digest in expected.items():
            path = entry / name
            if not path.is_file() or file_sha256(path) != digest:
                raise BadEntry(f"{name} does not match its checksum: truncated or changed")
        state = json.loads((entry / "state.json").read_text())
        with np.load(entry / "variables.npz") as arrays:
            values = [arrays[f"v{i}"] for i in range(len(state["paths"]))]
        return Phase1State(state["paths"], values, state["rows"], state["metrics"], state["report"])

    def save(self, key: str, state: Phase1State) -> None:
        """Write the entry whole: files, then their checksums (last), synced, then one rename."""
        if key not in self._held:
            raise RuntimeError(f"Phase1Cache.save({key!r}) outside locked({key!r})")
        entry = self.root / key
        partial = self.root / f"{key}{_PARTIAL}{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        buffer = io.BytesIO()
        np.savez(buffer, **{f"v{i}": value for i, value in enumerate(state.values)})
        meta = {"paths": state.paths, "rows": state.rows, "metrics": state.metrics, "report": state.report}
        files = {"variables.npz": buffer.getvalue(), "state.json": json.dumps(meta).encode()}
        for name, data in files.items():
            _write_synced(partial / name, data)
        checksums = {"files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        _write_synced(partial / CHECKSUMS, json.dumps(checksums).encode())
        shutil.rmtree(entry, ignore_errors=True)
        partial.rename(entry)
        _fsync_dir(self.root)

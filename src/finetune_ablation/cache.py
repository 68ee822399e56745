"""Never train the same phase 1 twice (config group ``cache``).

Phase 1 (frozen base, head training) depends only on the data, the seed, the base, augmentation,
dropout, the BN settings, batch size, base LR and initial epochs, not on anything of phase 2. Its end
state (every model variable: weights, BN statistics, random-seed states), its per-epoch rows and its
phase metrics are stored content-addressed by a hash of exactly those inputs plus the code and package
versions. A file lock per entry makes parallel jobs compute each entry once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from .config import CacheConfig
from .model import assign_values, copy_values
from .paths import MLRUNS_DIR
from .pretrain import demo_weights_path
from .tracking import package_versions

_PACKAGE_DIR = Path(__file__).resolve().parent


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


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def _code_hash() -> str:
    """The suite's own source: a code change must not reuse a phase 1 trained by other code."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def phase1_key(cfg: DictConfig, data_fingerprint: str) -> str:
    """Hash of exactly what phase 1 depends on (and nothing of phase 2)."""
    m = cfg.model
    path = demo_weights_path() if m.weights == "demo" else m.weights  # demo: the shipped base (pretrain.py)
    weights = m.weights if m.weights in (None, "imagenet") else f"file:{_file_sha256(path)}"
    inputs = {
        "data": {
            "fingerprint": data_fingerprint,
            "image_size": cfg.data.image_size,
            "batch_size": cfg.data.batch_size,
            "validation_split": cfg.data.validation_split,
            "seed": cfg.data.seed,
        },
        "model": {
            "name": m.name,
            "architecture": m.architecture,
            "alpha": m.alpha,
            "weights": weights,
            "dropout": m.dropout,
            "bn_training": m.bn_training,
            "calibrate_bn": m.calibrate_bn,
        },
        "augment": OmegaConf.to_container(cfg.augment),
        "train": {"base_lr": cfg.train.base_lr, "initial_epochs": cfg.train.initial_epochs},
        "diagnostics": str(cfg.diagnostics.level.value),
        "features": cfg.cache.features,  # equal to float tolerance, not bit for bit: keep entries apart
        "seed": cfg.seed,
        "versions": package_versions(),
        "code": _code_hash(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Phase1Cache:
    """Entries are folders ``<dir>/phase1/<key>/`` written whole (rename), read under a per-entry lock."""

    def __init__(self, directory: Path):
        self.root = directory / "phase1"

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold the entry: a second job with the same key waits, then finds the entry computed."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock")):
            yield

    def load(self, key: str) -> Phase1State | None:
        entry = self.root / key
        if not (entry / "state.json").is_file():
            return None
        state = json.loads((entry / "state.json").read_text())
        with np.load(entry / "variables.npz") as arrays:
            values = [arrays[f"v{i}"] for i in range(len(state["paths"]))]
        return Phase1State(state["paths"], values, state["rows"], state["metrics"], state["report"])

    def save(self, key: str, state: Phase1State) -> None:
        entry = self.root / key
        partial = self.root / f"{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.savez(partial / "variables.npz", **{f"v{i}": value for i, value in enumerate(state.values)})
        meta = {"paths": state.paths, "rows": state.rows, "metrics": state.metrics, "report": state.report}
        (partial / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(entry, ignore_errors=True)
        partial.rename(entry)

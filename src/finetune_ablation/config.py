"""Typed schema of the Hydra config. Each dataclass is one config group and is consumed by one module:
``data`` -> data.py, ``augment`` -> augment.py, ``model`` -> model.py, ``train`` -> train.py,
``tracking`` -> tracking.py, ``diagnostics`` -> diagnostics.py, ``cache`` -> cache.py.

Hydra validates types and key names against these classes at start-up; ``validate`` adds the range
checks a type cannot express, with one-line messages that name the setting and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

from .errors import UserError


@dataclass
class DataConfig:
    dir: str | None = None
    image_size: int = 160
    batch_size: int = 32
    validation_split: float = 0.2
    seed: int = 42
    # Write a small generated two-class image folder into ``dir`` first (the offline demo).
    synthetic: bool = False
    synthetic_images_per_class: int = 100


@dataclass
class AugmentConfig:
    flip: str | None = "horizontal"  # horizontal | vertical | horizontal_and_vertical | null
    rotation: float = 0.2  # fraction of a full turn, as keras.layers.RandomRotation
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0


@dataclass
class ModelConfig:
    # keras.applications sub-module (gives preprocess_input) and the constructor inside it.
    name: str = "mobilenet_v2"
    architecture: str = "MobileNetV2"
    alpha: float | None = 1.0  # width multiplier; null for bases that have none
    weights: str | None = "imagenet"  # imagenet | null | path to a local weights file
    dropout: float = 0.2
    fine_tune_at: Any = 120  # layer index or layer name; 0 = whole base
    bn_training: bool | None = False  # the training= value the base is called with
    freeze_bn: bool = False  # keep every BatchNormalization trainable=False when unfreezing
    # Re-estimate BN moving statistics on training images before phase 1 (for weights=null bases).
    calibrate_bn: bool = False


@dataclass
class TrainConfig:
    base_lr: float = 1e-3
    initial_epochs: int = 5
    fine_tune_lr: float = 1e-4
    fine_tune_epochs: int = 5
    verbose: int = 0  # Keras fit verbosity (0: only the console's short line per epoch)


@dataclass
class TrackingConfig:
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite under the project's mlruns/
    experiment: str = "finetune-ablation"
    run_name: str | None = None
    # Log the final model (MLflow Keras flavor, runs:/<id>/model); false saves time and space in big studies.
    log_model: bool = True


class DiagnosticsLevel(str, Enum):
    full = "full"
    final = "final"
    off = "off"


@dataclass
class DiagnosticsConfig:
    level: DiagnosticsLevel = DiagnosticsLevel.full


@dataclass
class CacheConfig:
    dir: str | None = None  # null: <project>/mlruns/cache
    phase1: bool = True  # reuse phase 1 across runs that share it (e.g. a study over fine_tune_at)
    features: bool = True  # augment=none: phase 1 runs the frozen base once per image (features.py)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 42
    # Multirun jobs whose config already FINISHED in the experiment are skipped (not retrained).
    resume: bool = True
    # TF threads per job; null = all cores, divided among the launcher's parallel jobs.
    threads: int | None = None
    # Filled by the Optuna sweeper; here so the schema accepts it.
    optuna: Any = None


def register_configs() -> None:
    """Register the schema so the primary config (``conf/config.yaml``) is validated against it."""
    ConfigStore.instance().store(name="schema", node=Config)


_FLIPS = {None, "horizontal", "vertical", "horizontal_and_vertical"}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Any) -> None:
    """Range checks on a composed config; raises UserError naming the key and the valid range."""
    d, m, t, a = cfg.data, cfg.model, cfg.train, cfg.augment
    _require(d.image_size >= 32, f"data.image_size={d.image_size} is too small: use 32 or more")
    _require(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be at least 1")
    _require(
        0 < d.validation_split < 1,
        f"data.validation_split={d.validation_split} must be between 0 and 1 (exclusive), e.g. 0.2",
    )
    _require(0 <= m.dropout < 1, f"model.dropout={m.dropout} is out of range: use a value in [0, 1), e.g. 0.2")
    for key, value in (("train.base_lr", t.base_lr), ("train.fine_tune_lr", t.fine_tune_lr)):
        _require(math.isfinite(value) and value > 0, f"{key}={value} must be a positive number, e.g. 1e-4")
    for key, value in (
        ("train.initial_epochs", t.initial_epochs),
        ("train.fine_tune_epochs", t.fine_tune_epochs),
    ):
        _require(value >= 1, f"{key}={value} must be at least 1")
    fta = m.fine_tune_at
    _require(
        isinstance(fta, str) or (isinstance(fta, int) and not isinstance(fta, bool) and fta >= 0),
        f"model.fine_tune_at={fta!r} must be a layer index >= 0 or a layer name",
    )
    _require(
        a.flip in _FLIPS,
        f"augment.flip={a.flip!r} is unknown: use one of horizontal, vertical, horizontal_and_vertical, null",
    )
    for key in ("rotation", "zoom", "translation", "contrast"):
        value = getattr(a, key)
        _require(0 <= value <= 1, f"augment.{key}={value} must be in [0, 1]")

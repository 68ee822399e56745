"""Typed schema of the Hydra config, and what each key means to the run record.

Each dataclass is one config group (``data``, ``augment``, ``model``, ``train``, ``tracking``,
``diagnostics``, ``cache``). Hydra validates types and key names against these classes at start-up;
``validate`` adds the range checks a type cannot express, with one-line messages that name the setting
and the fix.

Every key has a ``Role`` in its field metadata (a group's role is inherited by its keys; unmarked means
``phase1``). Every consumer derives from it, so a key added tomorrow is classified where it is declared:
the phase-1 cache key hashes every key that is not ``phase2``, ``recording``, ``display`` or
``data_source`` (a new key is in it by default: fail safe), the config hash (resume) every key that is
not ``recording``, ``display`` or ``execution``, the report's factors and the reproduce comparison only
keys that decide what a run computes. ``replicate`` marks the seeds a study averages over."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

from .errors import UserError
from .paths import EXPERIMENTS_DIR


class Role(str, Enum):
    """What a config key is to the run record (docs/run-record.md, "How config keys are classified")."""

    phase1 = "phase1"  # what phase 1 computes, and so the whole run: in every key, a factor (the default)
    phase2 = "phase2"  # only what phase 2 computes: outside the phase-1 cache key
    data_source = "data_source"  # where the images come from: the keys hash their content instead
    equivalent = "equivalent"  # how it is computed, equal to float tolerance: in the keys, not a factor
    # what the job ran with (TensorFlow's threads): the same computation, other last float bits. In the
    # phase-1 key (a cached phase 1 must hold the bits this run computes), not in resume's config hash and
    # not a factor (runs that differ only in it are one replicate: resume reuses, the report merges them)
    execution = "execution"
    recording = "recording"  # where, whether and how a run is recorded or cached: in no key
    display = "display"  # what the console shows: in no key


ROLE = "role"  # the field-metadata key holding a Role
REPLICATE = "replicate"  # field metadata: a seed the report averages over, never a factor
# Keys that decide what a run computes: the report's factors and copies, the reproduce comparison.
COMPUTING = frozenset({Role.phase1, Role.phase2, Role.data_source})
NOT_HASHED = frozenset({Role.recording, Role.display, Role.execution})  # left out of tracking.config_hash


# Field metadata, e.g. ``fine_tune_epochs: int = field(default=5, metadata=PHASE2)``
PHASE2 = {ROLE: Role.phase2}
DATA_SOURCE = {ROLE: Role.data_source}
EQUIVALENT = {ROLE: Role.equivalent}
EXECUTION = {ROLE: Role.execution}
RECORDING = {ROLE: Role.recording}
DISPLAY = {ROLE: Role.display}
SEED = {REPLICATE: True}


@dataclass
class DataConfig:
    dir: str | None = field(default=None, metadata=DATA_SOURCE)
    image_size: int = 160
    batch_size: int = 32
    validation_split: float = 0.2
    seed: int = field(default=42, metadata=SEED)
    # Write a small generated two-class image folder into ``dir`` first (the offline demo).
    synthetic: bool = field(default=False, metadata=DATA_SOURCE)
    synthetic_images_per_class: int = field(default=100, metadata=DATA_SOURCE)


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
    fine_tune_at: Any = field(default=120, metadata=PHASE2)  # layer index or layer name; 0 = whole base
    bn_training: bool | None = False  # the training= value the base is called with
    freeze_bn: bool = field(
        default=False, metadata=PHASE2
    )  # keep every BatchNormalization trainable=False when unfreezing
    # Re-estimate BN moving statistics on training images before phase 1 (for weights=null bases).
    calibrate_bn: bool = False


@dataclass
class TrainConfig:
    base_lr: float = 1e-3
    initial_epochs: int = 5
    fine_tune_lr: float = field(default=1e-4, metadata=PHASE2)
    fine_tune_epochs: int = field(default=5, metadata=PHASE2)
    verbose: int = field(
        default=0, metadata=DISPLAY
    )  # Keras fit verbosity (0: only the console's short line per epoch)


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


class Attribution(str, Enum):
    ordered = "ordered"  # effects removed in one order: BatchNorm, dropout, augmentation
    shapley = "shapley"  # averaged over all six orders (docs/gap-measurement.md, "The removal order")


@dataclass
class DiagnosticsConfig:
    level: DiagnosticsLevel = DiagnosticsLevel.full
    attribution: Attribution = Attribution.ordered


@dataclass
class CacheConfig:
    dir: str | None = field(default=None, metadata=RECORDING)  # null: <project>/mlruns/cache
    # Reuse phase 1 across runs that share it (e.g. a study over fine_tune_at): the restored state is
    # bit-identical, so whether it is used does not count.
    phase1: bool = field(default=True, metadata=RECORDING)
    # Train what lies above the frozen part of the base on its output: computed once per image (augment=none)
    # or every epoch in the pipeline (run/feature_cache.py). Equal to the uncached run only to float
    # tolerance: in both keys, not a factor.
    features: bool = field(default=True, metadata=EQUIVALENT)
    # Where a run keeps what it computes once (run/kept_rows.py, docs/caches.md "Large folders"): in memory
    # up to these budgets, past them in a scratch file in scratch_dir, recomputed when the disk would keep
    # less than scratch_keep_free_mib free. Memory and disk hold the same bits: in no key.
    pixels_memory_mib: int = field(default=256, metadata=RECORDING)  # the decoded, resized images
    frozen_inputs_memory_mib: int = field(default=256, metadata=RECORDING)  # a phase's frozen inputs
    scratch_dir: str | None = field(default=None, metadata=RECORDING)  # null: the system's temp folder ($TMPDIR)
    scratch_keep_free_mib: int = field(default=1024, metadata=RECORDING)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=RECORDING)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = field(default=42, metadata=SEED)
    # Multirun jobs whose config already FINISHED in the experiment are skipped (not retrained).
    resume: bool = field(default=True, metadata=RECORDING)
    # TF threads per job; null = what the engine granted the job (SLURM_CPUS_PER_TASK, Ray's num_cpus, else
    # the cores), divided among the launcher's parallel jobs. The run logs the count it used (threads.py).
    threads: int | None = field(default=None, metadata=EXECUTION)
    # Filled by the Optuna sweeper (its hand-off to the live study); here so the schema accepts it.
    optuna: Any = field(default=None, metadata=RECORDING)


@functools.cache
def _schema_keys(schema: type, prefix: str = "", inherited: Role = Role.phase1) -> dict[str, tuple[Role, bool]]:
    hints = typing.get_type_hints(schema)
    out: dict[str, tuple[Role, bool]] = {}
    for f in dataclasses.fields(schema):
        name, role = f"{prefix}{f.name}", f.metadata.get(ROLE, inherited)
        out[name] = (role, bool(f.metadata.get(REPLICATE)))
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_schema_keys(hints[f.name], f"{name}.", role))
    return out


def schema_of(cfg: Any) -> type:
    """The dataclass a composed config was validated against (``Config`` for a plain mapping)."""
    from omegaconf import OmegaConf

    kind = OmegaConf.get_type(cfg) if OmegaConf.is_config(cfg) else None
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else Config


def role_of(key: str, schema: type | None = None) -> Role:
    """The role of a dotted key (or of its nearest declared parent: ``optuna.study_name`` is the
    sweeper's ``optuna`` hand-off); a key the schema does not declare is ``phase1`` (fail safe)."""
    declared = _schema_keys(schema or Config)
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = declared.get(".".join(parts[:end]))
        if found is not None:
            return found[0]
    return Role.phase1


def replicate_keys(schema: type | None = None) -> tuple[str, ...]:
    """The seeds a study's levels are averaged over (outer keys first: ``seed``, ``data.seed``)."""
    keys = [k for k, (_, replicate) in _schema_keys(schema or Config).items() if replicate]
    return tuple(sorted(keys, key=lambda k: k.count(".")))


def without_roles(container: dict[str, Any], roles: Iterable[Role], schema: type | None = None) -> dict[str, Any]:
    """A copy of a resolved config (nested dicts) without the keys whose role is in ``roles``."""
    excluded = frozenset(roles)

    def keep(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if role_of(dotted, schema) in excluded:
                continue
            out[key] = keep(value, f"{dotted}.") if isinstance(value, dict) else value
        return out

    return keep(container, "")


def register_configs() -> None:
    """Register the schema, so the primary config (``conf/config.yaml``) is validated against it, and
    every ``experiments/NAME.yaml`` as the option ``experiment=NAME`` (package ``_global_``). An explicit
    call, made before anything composes a config: ``ablate``'s entry point, ``ablate-reproduce``'s
    re-composition and the tests. Calling it again stores the same nodes again."""
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


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
    for key in ("pixels_memory_mib", "frozen_inputs_memory_mib", "scratch_keep_free_mib"):
        value = getattr(cfg.cache, key)
        _require(value >= 0, f"cache.{key}={value} must be 0 or more (MiB)")
    for key in ("rotation", "zoom", "translation", "contrast"):
        value = getattr(a, key)
        _require(0 <= value <= 1, f"augment.{key}={value} must be in [0, 1]")

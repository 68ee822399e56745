"""The two-phase fine-tuning run (config group ``train``, and the phase policy of ``model``, ``cache`` and
``diagnostics``): config -> data -> model -> phase 1 -> phase 2 -> record. Everything measured goes to a
``Recorder`` (recorder.py: the active MLflow run by default), under the names of the run record (record.py).

Phase 1 trains the head on a frozen base. Phase 2 unfreezes the base from ``model.fine_tune_at`` and
recompiles with a NEW optimizer at the lower rate: the outer model holds the very same base object, so
the new trainable set is visible at once, but ``fit()`` only trains it after a recompile (docs/stack-facts.md K3)."""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from .. import record as rec
from ..chance import accuracy_interval
from ..config import DiagnosticsLevel
from ..console import print_epoch
from ..descriptions import run_description
from ..gap.callback import GapCallback, Precomputed
from ..gap.decomposition import chance_warning, majority_rate
from ..gap.keras_probe import probe
from ..gap.meter import TrainingOrder
from ..gap.plot import gap_chart
from ..gap.sentence import gap_summary
from . import feature_cache
from .augment import build_augmentation
from .data import Datasets, load_datasets
from .epoch_logger import EpochLogger
from .feature_cache import FrozenInputs
from .freed_memory import ReturnFreedMemory
from .kept_rows import Storage
from .model import (
    Classifier,
    bn_moving_stats,
    build_classifier,
    calibrate_batchnorm,
    compile_for_fit,
    freeze_base,
    load_base,
    max_abs_change,
    resolve_fine_tune_at,
    trainable_report,
    trainable_summary,
    unfreeze_top,
)
from .phase1_cache import Phase1Cache, Phase1State, cache_dir, phase1_key
from .plots import learning_curves
from .recorder import MlflowRecorder, Recorder
from .split_datasets import split_datasets


def seed_everything(seed: int) -> None:
    """Fresh Keras state and one seed for Python, NumPy and TF; deterministic ops (docs/stack-facts.md T1: identical
    weights across processes on CPU). Also needed when a launcher reuses a worker process."""
    keras.backend.clear_session()
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def loss_and_accuracy(binary: bool) -> tuple[keras.losses.Loss, keras.metrics.Metric]:
    """Loss and accuracy on logits. Binary accuracy thresholds logits at 0: the course's
    ``metrics=["accuracy"]`` would threshold logits at 0.5 and count a logit of 0.3 as class 0
    (docs/stack-facts.md K5)."""
    if binary:
        return (
            keras.losses.BinaryCrossentropy(from_logits=True),
            keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
        )
    return (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
    )


def compile_fresh(model: keras.Model, binary: bool, learning_rate: float) -> None:
    """Always a NEW optimizer: reusing the one built for another trainable set raises in Keras 3."""
    loss, accuracy = loss_and_accuracy(binary)
    compile_for_fit(model, keras.optimizers.Adam(learning_rate), loss, [accuracy])


def _record_data(data: Datasets, cfg: DictConfig, recorder: Recorder) -> None:
    splits = {"train": data.train_files, "val": data.val_files}
    recorder.datasets(split_datasets(cfg.dir, data.class_names, splits, cfg.image_size))
    counts = {f"{rec.DATA_COUNT_PARAM_PREFIX}{k}": v for k, v in data.counts().items()}
    recorder.params({**counts, rec.CLASS_NAMES_PARAM: ",".join(data.class_names)[: rec.MAX_PARAM_LENGTH]})
    recorder.tags(
        {
            rec.DATA_FINGERPRINT_TAG: data.fingerprint,
            rec.CROSS_SPLIT_DUPLICATES_TAG: str(data.cross_split_duplicates),
            rec.DECODED_PIXELS_STORAGE_TAG: str(data.pixels),
        }
    )
    if data.cross_split_duplicates:
        recorder.tags(
            {rec.WARNING_TAG: f"{data.cross_split_duplicates} validation image(s) are exact copies of training images"}
        )


@dataclass
class PhaseRecord:
    """What a phase leaves besides its per-epoch rows: phase metrics and the trainable-weights report."""

    phase: int
    metrics: dict[str, float]
    report: str
    storable: bool = True  # may go into the phase-1 cache (False: computed on a fallback path)

    def log(self, recorder: Recorder) -> None:
        recorder.phase(self.phase, self.metrics, self.report)


def fit_epochs(
    model: keras.Model,
    batches: tf.data.Dataset,
    steps: int,
    val: tf.data.Dataset,
    first_epoch: int,
    epochs: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: int,
) -> None:
    """``fit`` for ``epochs`` epochs numbered from ``first_epoch``, epoch k on the k-th pass over
    ``batches`` (``steps`` batches each). Given a dataset of known length, Keras makes a new iterator at
    every epoch's end (without ``steps_per_epoch``, two, and throws one away: a reshuffle lost), and each
    new iterator sets up again every function the pipeline maps: with the frozen base in the map, 0.4-0.6 s.
    Repeated, the dataset is iterated once per phase, each pass reshuffled as a new iterator would be
    (docs/stack-facts.md K10)."""
    model.fit(
        batches.repeat(),
        validation_data=val,
        steps_per_epoch=steps,
        initial_epoch=first_epoch,
        epochs=first_epoch + epochs,  # epochs continue from phase 1: no repeated epoch number
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the training split is already reshuffled every epoch by tf.data
    )


def _run_phase(
    clf: Classifier,
    data: Datasets,
    cfg: DictConfig,
    phase: int,
    learning_rate: float,
    first_epoch: int,
    epochs: int,
    rows: list[dict],
    extra_callbacks: list[keras.callbacks.Callback],
    recorder: Recorder,
) -> PhaseRecord:
    """Compile with a new optimizer, fit ``epochs`` epochs numbered from ``first_epoch``, measure.
    Where the frozen part of the base is a fixed function of the image, what lies above it is trained on
    its output (computed once, or every epoch with augmentation: feature_cache)."""
    measuring = cfg.diagnostics.level != DiagnosticsLevel.off
    inputs = _frozen_inputs(clf, data, cfg, phase, recorder, measuring)
    model, source = (inputs.model, inputs) if inputs else (clf.model, data)
    compile_fresh(model, clf.binary, learning_rate)
    summary = {k: float(v) for k, v in trainable_summary(clf).items()}
    report = trainable_report(clf)
    callbacks: list[keras.callbacks.Callback] = []
    steps = math.ceil(len(data.train_files) / data.batch_size)
    if measuring:
        dataset, stage, epoch_batches = inputs.measured_on() if inputs else (data.train_in_order, None, None)
        if epoch_batches is not None:
            callbacks.append(epoch_batches)  # empties itself as each epoch begins
        # the notebook's callback; on frozen inputs fit trains the top on them, and the whole model is measured
        callbacks.append(
            GapCallback(
                dataset,
                validation_size=len(data.val_files),
                seed=cfg.seed,
                when="every_epoch" if cfg.diagnostics.level == DiagnosticsLevel.full else "last_epoch",
                model=clf.model,
                precomputed=Precomputed(stage, epoch_batches) if stage is not None else None,
                # recomputed augmented frozen inputs keep no batches to replay: the meter draws its own
                order=None if inputs and stage is None else _training_order(data, inputs, phase, steps),
                attribution=str(cfg.diagnostics.attribution.value),  # docs/gap-measurement.md
                verbose=False,  # the run's own record says what is measured (docs/gap-measurement.md)
            )
        )
    callbacks.append(EpochLogger(phase, rows, recorder))
    callbacks.append(ReturnFreedMemory())  # after the epoch's measuring and logging, before a caller's own
    callbacks.extend(extra_callbacks)
    before = bn_moving_stats(clf.base)
    fit_epochs(
        model, source.training_batches(phase), steps, source.val, first_epoch, epochs, callbacks, cfg.train.verbose
    )
    summary["bn_moving_stats_delta"] = max_abs_change(before, bn_moving_stats(clf.base))
    # a phase on frozen inputs that fell back to recomputing may not be bit-identical to one that kept them
    storable = not inputs or inputs.placement.where != "recomputed"
    record = PhaseRecord(phase, summary, report, storable)
    record.log(recorder)
    return record


def _training_order(data: Datasets, inputs: FrozenInputs | None, phase: int, steps: int) -> TrainingOrder:
    """The phase's training batches as ``fit`` reads them, un-augmented (the images, or the clean images'
    frozen inputs), from a pipeline of their own: the gap measurement replays each epoch's own batches
    (docs/gap-measurement.md)."""
    if inputs is None:
        return TrainingOrder(lambda: data.training_batches(phase), steps)
    assert inputs.clean_order is not None, "measuring keeps or recomputes the clean training inputs"
    return TrainingOrder(inputs.clean_order, steps)


def _frozen_inputs(
    clf: Classifier, data: Datasets, cfg: DictConfig, phase: int, recorder: Recorder, measuring: bool
) -> FrozenInputs | None:
    """The frozen part's output, computed ahead of the top when ``cache.features`` is on and it is a fixed
    function of the image (once, or every epoch with augmentation); the phase's tag says which part, or why
    none. ``measuring``: the gap measurement will read them (feature_cache.compute)."""
    tag = rec.feature_cache_tag(phase)
    if not cfg.cache.features:
        recorder.tags({tag: "off"})
        return None
    storage = Storage.from_config(cfg.cache)
    the_plan = feature_cache.plan(clf, len(data.train_files), len(data.val_files), storage, measuring)
    if the_plan.stage is None:
        recorder.tags({tag: f"not used: {the_plan.reason}"})
        return None
    recorder.tags({tag: f"on: {the_plan.reason}"})
    inputs = feature_cache.compute(clf, data, the_plan, phase, measuring, storage)
    recorder.tags({rec.frozen_inputs_storage_tag(phase): str(inputs.placement)})
    return inputs


def _phase1(clf: Classifier, data: Datasets, cfg: DictConfig, rows: list[dict], recorder: Recorder) -> None:
    """Phase 1: calibrate (if asked) and train the head on the frozen base, or load it from the cache."""

    def train() -> PhaseRecord:
        if cfg.model.calibrate_bn:
            batches = [x.numpy() for x, _ in data.train_in_order.take(max(1, 256 // cfg.data.batch_size))]
            calibrate_batchnorm(clf.base, clf.preprocess, np.concatenate(batches))
        freeze_base(clf.base)
        t = cfg.train
        return _run_phase(clf, data, cfg, 1, t.base_lr, 0, t.initial_epochs, rows, [], recorder)

    if not cfg.cache.phase1:
        recorder.tags({rec.PHASE1_CACHE_TAG: "off"})
        train()
        return
    cache = Phase1Cache(cache_dir(cfg.cache))
    key = phase1_key(cfg, data.fingerprint)
    recorder.tags({rec.PHASE1_CACHE_KEY_TAG: key})
    with cache.locked(key):
        state = cache.load(key)
        if state is None:
            record = train()
            if record.storable:
                cache.save(key, Phase1State.capture(clf.model, rows, record.metrics, record.report))
            recorder.tags({rec.PHASE1_CACHE_TAG: "miss"})
            return
    freeze_base(clf.base)
    state.restore(clf.model)
    for row in state.rows:  # every run still holds complete curves, and the console shows them
        metrics = {k: v for k, v in row.items() if k not in ("epoch", "phase")}
        recorder.epoch(row["epoch"], metrics)
        print_epoch(1, row["epoch"], len(state.rows), metrics, note="from the phase-1 cache")
    rows.extend(state.rows)
    PhaseRecord(1, state.metrics, state.report).log(recorder)
    recorder.tags({rec.PHASE1_CACHE_TAG: "hit"})


def _record_keras_behaviour(recorder: Recorder) -> None:
    """Which behaviour the run ran under: what this Keras does with ``base(x, training=False)`` during fit
    (gap.probe, measured on tiny models), so a run of another Keras says so (docs/stack-facts.md)."""
    behaviour = probe()
    recorder.tags(
        {
            rec.TRAINING_FALSE_KEEPS_BN_FROZEN_TAG: str(behaviour.training_false_keeps_bn_frozen).lower(),
            rec.DROPOUT_AFTER_TRAINING_FALSE_TAG: str(behaviour.dropout_after_training_false_active).lower(),
            rec.KERAS_PROBE_TAG: behaviour.sentence()[: rec.MAX_TAG_LENGTH],
        }
    )


def weights_digest(model: keras.Model) -> str:
    """Hash of every model variable (weights, BN statistics, seed states): bit-identity in one string."""
    digest = hashlib.sha256()
    for v in model.variables:
        digest.update(v.path.encode())
        digest.update(np.ascontiguousarray(v.numpy()).tobytes())
    return digest.hexdigest()


def _tag_seconds(phase: str, started: float, recorder: Recorder) -> None:
    """Wall time of a phase, as a tag: timings differ between identical runs, metrics must not."""
    recorder.tags({rec.timing_tag(phase): f"{time.perf_counter() - started:.2f}"})


def train_and_log(
    cfg: DictConfig,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    recorder: Recorder | None = None,
) -> float:
    """Run both phases, recording into ``recorder`` (the active MLflow run by default); returns the
    final ``val_accuracy``."""
    recorder = recorder or MlflowRecorder()
    _record_keras_behaviour(recorder)  # before seeding: the probe's tiny models leave no trace in the run
    seed_everything(cfg.seed)
    data = load_datasets(cfg.data, Storage.from_config(cfg.cache))
    _record_data(data, cfg.data, recorder)

    base = load_base(cfg.model, cfg.data.image_size)
    augmentation = build_augmentation(cfg.augment, cfg.seed)
    clf = build_classifier(cfg.model, base, augmentation, data.num_classes, cfg.data.image_size)
    base_index = next(i for i, layer in enumerate(clf.model.layers) if layer is base)
    recorder.tags({rec.SAME_BASE_OBJECT_TAG: f"model.layers[{base_index}] is base: True"})
    recorder.params({rec.BASE_LAYERS_PARAM: len(base.layers)})

    fine_tune_at = resolve_fine_tune_at(base, cfg.model.fine_tune_at)  # fail before training
    rows: list[dict] = []
    started = time.perf_counter()
    _phase1(clf, data, cfg, rows, recorder)
    _tag_seconds("phase1", started, recorder)

    first_unfrozen = unfreeze_top(base, fine_tune_at, cfg.model.freeze_bn)
    recorder.params(
        {
            rec.FINE_TUNE_AT_INDEX_PARAM: fine_tune_at,
            rec.FIRST_UNFROZEN_PARAM: first_unfrozen or "none (nothing unfrozen)",
        }
    )
    t = cfg.train
    started = time.perf_counter()
    more = extra_callbacks or []  # e.g. the Optuna trial reporter
    _run_phase(clf, data, cfg, 2, t.fine_tune_lr, t.initial_epochs, t.fine_tune_epochs, rows, more, recorder)
    _tag_seconds("phase2", started, recorder)
    return _record_result(cfg, clf, data, rows, recorder)


def _record_result(cfg: DictConfig, clf: Classifier, data: Datasets, rows: list[dict], recorder: Recorder) -> float:
    """The run's end: history, chance check, figures, gap summary, config, weights digest, the model."""
    history = pd.DataFrame(rows)
    recorder.table(history, rec.HISTORY_CSV)
    val_accuracy = float(history[rec.VAL_ACCURACY].iloc[-1])
    majority = majority_rate([f.class_name for f in data.val_files])
    warning = _record_chance(data, val_accuracy, majority, recorder)
    recorder.figure(learning_curves(history), rec.LEARNING_CURVES_PNG)
    if rec.GAP_TOTAL in history:
        recorder.figure(gap_chart(history, warning), rec.GAP_PNG)
    attribution = str(cfg.diagnostics.attribution.value)
    n_val = len(data.val_files)
    summary = gap_summary(rows, warning, val_count=n_val, majority=majority, attribution=attribution)
    recorder.text(summary, rec.GAP_SUMMARY_TXT)
    interval = accuracy_interval(val_accuracy, n_val)
    figures = [rec.GAP_PNG] if rec.GAP_TOTAL in history else [rec.LEARNING_CURVES_PNG]
    recorder.description(run_description(summary, val_accuracy, interval, n_val, majority), figures)
    recorder.text(OmegaConf.to_yaml(cfg, resolve=True), rec.CONFIG_YAML)
    recorder.tags({rec.WEIGHTS_DIGEST_TAG: weights_digest(clf.model)})
    if cfg.tracking.log_model:
        recorder.model(clf.model)
    return val_accuracy


def _record_chance(data: Datasets, val_accuracy: float, majority: float, recorder: Recorder) -> str | None:
    """``val_majority_rate`` and the tag ``gap.at_chance``: is the final model distinguishable from
    always guessing the larger class? Returns the warning that summary and chart must lead with, and says
    it on the console too (the last thing a user reads of a run at chance)."""
    warning = chance_warning(val_accuracy, len(data.val_files), majority)
    recorder.metrics({rec.VAL_MAJORITY_RATE: majority})
    recorder.tags({rec.AT_CHANCE_TAG: str(warning is not None).lower()})
    if warning:
        print(warning, flush=True)
    return warning

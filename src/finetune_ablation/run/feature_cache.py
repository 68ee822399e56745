"""Frozen inputs (``cache.features``): the frozen part of the base runs once per image, or once per epoch.

A frozen layer without randomness computes the same output for an image in every epoch: a non-trainable
BatchNormalization uses its moving statistics whatever ``training`` says (docs/stack-facts.md K1). So
whatever lies below the first layer that trains or draws random numbers is a fixed function of its input
image, and a phase can train the rest on its output:

- **pooled features** while the whole base is frozen and has no random layers (phase 1; phase 2 when
  ``fine_tune_at`` is past the end): the head is trained on the pooled base output;
- **bottom activations** while only the top is unfrozen (phase 2; or phase 1 of a base with random layers,
  such as EfficientNet's stochastic depth, cut below the first one): the unfrozen top, the pooling and the
  head are trained on the tensors that cross the cut (``passes.FrozenBottom``).

Without augmentation the images are the same every epoch, so their frozen inputs are computed once for
both splits. With augmentation, validation's and the clean training images' are computed once, and the
training pipeline maps each epoch's augmented batches through the frozen part as it goes (the same random
layers, seed states and shuffle orders as the model's own call, so the same draws); the gap measurement
then reads the very inputs the epoch trained on (``EpochBatches``) instead of running the frozen part
again.

Either way the model trained is made of the very same layer objects (same weights, BN statistics and
dropout seed state), fed in the same shuffle orders as the images, and validation and the gap measurement
read the same inputs. Results equal the uncached path to float tolerance (tests/test_cache.py, metric by
metric). The inputs live for one phase: in memory within ``cache.frozen_inputs_memory_mib``, past it in a
scratch file on local disk (``kept_rows``: the same bits, so the same metrics), and when the disk has no
room they are recomputed from the images at every read (in the same batches for validation and the
measurement; with augmentation the epoch's augmented inputs are not kept, so the measurement runs the
whole model on the images with its own draws: docs/caches.md, "A full disk")."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..gap.layers import has_random_layers
from ..gap.meter import Stage
from ..gap.passes import FrozenBottom, MeasuringPasses, as_list
from .augment import augments
from .data import Datasets, Split
from .kept_rows import KeptRows, Placement, Storage, announce, place, why
from .model import Classifier

BUDGET_KEY = "cache.frozen_inputs_memory_mib"
WHAT = "frozen inputs"


def why_base_varies(base: keras.Model) -> str | None:
    """None if ``base`` maps an image to the same features on every pass; otherwise why it does not."""
    if base.trainable_weights:
        return "the base is not fully frozen"
    if has_random_layers(base):
        return f"{base.name} has random layers (e.g. stochastic depth) that act in training mode"
    return None


@dataclass(frozen=True)
class Plan:
    """What a phase can compute ahead of its top: ``stage`` (None: nothing, see ``reason``), for ``bottom``
    where the base is cut, whether the training images change every epoch (augmentation), and where the
    inputs are kept (``placement``)."""

    stage: Stage | None
    reason: str
    cut: int | None = None
    every_epoch: bool = False
    placement: Placement | None = None


def kept_images(train_count: int, val_count: int, every_epoch: bool, measuring: bool) -> int:
    """How many images' frozen inputs a phase keeps: validation's; the clean training images' unless they
    are only measured and nothing measures; and with augmentation and measuring, one epoch's augmented
    batches (the gap measurement reads them at the epoch's end)."""
    clean = train_count if measuring or not every_epoch else 0
    return val_count + clean + (train_count if every_epoch and measuring else 0)


def plan(
    clf: Classifier,
    train_count: int,
    val_count: int,
    storage: Storage | None = None,
    measuring: bool = True,
) -> Plan:
    """Which frozen inputs are fixed functions of the image for the phase about to run (the trainable set
    must be final), and where they are kept (``kept_rows.place``: memory, a scratch file, or recomputed)."""
    every_epoch = augments(clf.augmentation)
    when = "every epoch from the augmented images (validation's and the clean ones' once)" if every_epoch else "once"
    if why_base_varies(clf.base) is None:
        stage: Stage = "pooled"
        reason = f"the whole base is frozen: its pooled features are computed {when}"
        cut, per_image = None, 4 * int(np.prod(clf.pooled_shape))
    else:
        cut = FrozenBottom.cut_of(clf.base)
        if cut is None or not any(layer.weights for layer in clf.base.layers[:cut]):
            return Plan(None, f"no layer with weights of {clf.base.name} is frozen below the first that trains")
        stage = "bottom"
        per_image = MeasuringPasses.of(clf.model).frozen_bottom(cut).bytes_per_image
        reason = f"layers 0-{cut - 1} of {clf.base.name} (below {clf.base.layers[cut].name}) computed {when}"
    nbytes = per_image * kept_images(train_count, val_count, every_epoch, measuring)
    storage = storage or Storage.from_config()
    placement = place(nbytes, storage.frozen_inputs_memory_bytes, BUDGET_KEY, storage)
    return Plan(stage, f"{reason}, {nbytes / 2**20:.1f} MiB", cut, every_epoch, placement)


class KeptBatches:
    """The batches ``EpochBatches`` kept this epoch, read back in order: (inputs, labels) per batch."""

    def __init__(self, rows: KeptRows, spans: list[tuple[int, int, tf.Tensor]]):
        self.rows, self.spans = rows, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __iter__(self):
        for start, stop, y in self.spans:
            yield [tf.constant(column) for column in self.rows.read_range(start, stop)], y


class EpochBatches(keras.callbacks.Callback):
    """The frozen inputs and labels of the current epoch's training batches, as the augmenting pipeline
    made them (in training order and batch composition), for the gap measurement at the epoch's end.
    They are written into ``rows`` (memory or a scratch file), one epoch over the last."""

    def __init__(self, rows: KeptRows):
        super().__init__()
        self.rows = rows
        self._spans: list[tuple[int, int, tf.Tensor]] = []
        self._next = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._spans, self._next = [], 0

    def keep(self, y: tf.Tensor, *inputs: tf.Tensor) -> tf.Tensor:
        n = int(y.shape[0])
        self.rows.write(self._next, [t.numpy() for t in inputs])
        self._spans.append((self._next, self._next + n, y))
        self._next += n
        return tf.constant(True)

    @property
    def batches(self) -> KeptBatches:
        return KeptBatches(self.rows, list(self._spans))


def _as_inputs(columns) -> tf.Tensor | tuple[tf.Tensor, ...]:
    """A model's input(s) as a dataset element: one tensor, or a tuple for several (the frozen bottom's
    residual connections)."""
    columns = as_list(columns)
    return columns[0] if len(columns) == 1 else tuple(columns)


@dataclass
class FrozenInputs:
    """Both splits' frozen inputs (pooled features or bottom activations), served like ``Datasets``
    serves images, and the model that maps them to logits over the classifier's own layers. With
    augmentation, the training batches are mapped through the frozen part every epoch (``augmented``)."""

    stage: Stage
    model: keras.Model
    placement: Placement
    train_in_order: tf.data.Dataset | None  # (inputs, label) batches of the clean training split, in order
    val: tf.data.Dataset  # validation (inputs, label), batched
    data: Datasets
    shuffled: tf.data.Dataset | None = None  # augment=none: the phase's shuffled (inputs, label) batches
    # a new pipeline of the clean training inputs in fit's orders, each call (the measurement's replay)
    clean_order: Callable[[], tf.data.Dataset] | None = None
    augmented: tf.data.Dataset | None = None  # (augmented inputs, label) per batch, every epoch anew
    epoch_batches: EpochBatches | None = None  # what ``augmented`` produced this epoch, if kept

    def training_batches(self, phase: int) -> tf.data.Dataset:
        """Exactly the image pipeline's shuffle orders (same seed, phase and count)."""
        return self.augmented if self.augmented is not None else self.shuffled

    def measured_on(self) -> tuple[tf.data.Dataset, Stage | None, EpochBatches | None]:
        """What the gap measurement reads (``GapMeter``'s dataset, stage and epoch batches): these inputs;
        or, when they are recomputed and the epoch's augmented ones could not be kept, the images (the
        meter then draws its own augmentations and runs the frozen part itself)."""
        if self.augmented is not None and self.epoch_batches is None:
            return self.data.train_in_order, None, None
        return self.train_in_order, self.stage, self.epoch_batches


def _head_model(clf: Classifier, the_plan: Plan) -> tuple[keras.Model, object, list[tuple[int, ...]]]:
    """The part of the classifier above the frozen inputs, the traced pass that computes them, and their
    shapes (one image's)."""
    passes = MeasuringPasses.of(clf.model)
    if the_plan.stage == "pooled":
        inputs = keras.Input(shape=clf.pooled_shape, name="pooled_features")
        model = keras.Model(inputs, clf.head(clf.dropout(inputs)), name="head_on_features")
        return model, passes.features_infer, [tuple(clf.pooled_shape)]
    split = passes.split()
    assert split is not None and split.cut == the_plan.cut, "the trainable set changed after planning"
    specs = split.frozen.specs
    inputs = [keras.Input(shape=spec.shape[1:], name=f"frozen_bottom_{i}") for i, spec in enumerate(specs)]
    top = split.frozen.top
    # the base's own call, as build_classifier makes it: the same training flag reaches the same layers
    x = top(inputs) if clf.bn_training is None else top(inputs, training=clf.bn_training)
    outputs = clf.head(clf.dropout(clf.pool(x)))
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name="top_on_bottom")
    return model, split.bottom, [tuple(spec.shape[1:]) for spec in specs]


def _threaded(batches: tf.data.Dataset) -> tf.data.Dataset:
    """A pipeline that maps through the frozen part, on TF's full intra-op thread count (tf.data's default
    of one thread per map would halve the speed of the frozen pass)."""
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = (
        tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1
    )
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)


def _mapped(forward, batches: tf.data.Dataset) -> tf.data.Dataset:
    """(pixels, label) batches -> (frozen inputs, label) batches, computed as the pipeline runs, in order."""
    return _threaded(batches.map(lambda x, y: (_as_inputs(forward(x)), y)))


def _augmenting(clf: Classifier, forward, data: Datasets, phase: int, kept: EpochBatches | None) -> tf.data.Dataset:
    """The phase's shuffled image batches, augmented and mapped through the frozen part as the pipeline
    runs: the model's own random layers draw from their seed states in the same order as in the model's
    call, so the draws are the same. The map runs in order (one draw after the other)."""

    def augment_and_forward(x, y):
        inputs = as_list(forward(clf.augmentation(x, training=True)))
        if kept is not None:
            done = tf.py_function(kept.keep, [y, *inputs], Tout=tf.bool)
            with tf.control_dependencies([done]):
                inputs = [tf.identity(t) for t in inputs]
        return _as_inputs(inputs), y

    return _threaded(data.training_batches(phase).map(augment_and_forward))


def _keep(forward, split: Split, shapes, where, storage: Storage) -> KeptRows:
    """Run ``forward`` once over ``split`` in order, keeping its output row by row (memory or disk)."""
    rows = KeptRows(shapes, len(split.files), where, storage.scratch_dir)
    try:
        start = 0
        for x, _ in split.in_order().prefetch(tf.data.AUTOTUNE):
            columns = [t.numpy() for t in as_list(forward(x))]
            rows.write(start, columns)
            start += len(columns[0])
    except BaseException:
        rows.close()
        raise
    return rows


def _read(rows: KeptRows, split: Split, indices: tf.data.Dataset) -> tf.data.Dataset:
    """(kept inputs, label) for each batch of positions in ``split``."""
    labels = tf.constant(split.labels)
    return indices.map(lambda i: (_as_inputs(rows.gather(i)), tf.gather(labels, i))).prefetch(tf.data.AUTOTUNE)


def compute(
    clf: Classifier, data: Datasets, the_plan: Plan, phase: int, measuring: bool, storage: Storage | None = None
) -> FrozenInputs:
    """Compute the splits' frozen inputs once where ``the_plan`` keeps them (``plan``, for the current
    trainable set); with augmentation, also the pipeline that computes the training batches' every epoch.
    The clean training images' are then needed only by the gap measurement: computed, and each epoch's
    augmented ones kept, only when ``measuring``. A scratch file that cannot be reserved or written falls
    back to recomputing at every read, with a warning."""
    assert the_plan.stage is not None and the_plan.placement is not None, the_plan.reason
    storage = storage or Storage.from_config()
    model, forward, shapes = _head_model(clf, the_plan)
    placement = the_plan.placement
    clean_needed = measuring or not the_plan.every_epoch
    val_rows = clean_rows = epoch_rows = None
    if placement.where != "recomputed":
        try:
            val_rows = _keep(forward, data.validation, shapes, placement.where, storage)
            if clean_needed:
                clean_rows = _keep(forward, data.train, shapes, placement.where, storage)
            if the_plan.every_epoch and measuring:
                epoch_rows = KeptRows(shapes, len(data.train.files), placement.where, storage.scratch_dir)
        except OSError as exc:
            for rows in (val_rows, clean_rows, epoch_rows):
                if rows is not None:
                    rows.close()
            val_rows = clean_rows = epoch_rows = None
            placement = placement.fell_back(WHAT, f"their scratch file could not be reserved or written ({why(exc)})")
    announce(f"{WHAT} of phase {phase}", placement)
    if val_rows is not None:
        val = _read(val_rows, data.validation, data.validation.positions())
        train_in_order = _read(clean_rows, data.train, data.train.positions()) if clean_rows else None

        def clean_order() -> tf.data.Dataset:
            return _read(clean_rows, data.train, data.index_batches(phase))
    else:  # recomputed: the same batches as above for validation and the clean split, so the same inputs
        val = _mapped(forward, data.val)
        train_in_order = _mapped(forward, data.train_in_order) if clean_needed else None

        def clean_order() -> tf.data.Dataset:
            return _mapped(forward, data.training_batches(phase))

    clean = clean_order if clean_needed else None
    shuffled = None if the_plan.every_epoch else clean_order()
    inputs = FrozenInputs(the_plan.stage, model, placement, train_in_order, val, data, shuffled, clean)
    if the_plan.every_epoch:
        inputs.epoch_batches = EpochBatches(epoch_rows) if epoch_rows is not None else None
        inputs.augmented = _augmenting(clf, forward, data, phase, inputs.epoch_batches)
    return inputs

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
metric). The inputs live in memory for one phase; past ``BUDGET_BYTES`` the phase runs on images."""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from ..gap.layers import has_random_layers
from ..gap.meter import Stage
from ..gap.passes import FrozenBottom, MeasuringPasses, as_list
from .augment import augments
from .data import Datasets
from .model import Classifier

BUDGET_BYTES = 1 << 30  # both splits' frozen inputs (and, with augmentation, one epoch's), float32


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
    where the base is cut, and whether the training images change every epoch (augmentation)."""

    stage: Stage | None
    reason: str
    cut: int | None = None
    every_epoch: bool = False


def plan(clf: Classifier, train_count: int, val_count: int) -> Plan:
    """Which frozen inputs are fixed functions of the image for the phase about to run (the trainable set
    must be final), and whether they fit in memory: both splits' once, plus one epoch's with augmentation."""
    every_epoch = augments(clf.augmentation)
    when = "every epoch from the augmented images (validation's and the clean ones' once)" if every_epoch else "once"
    if why_base_varies(clf.base) is None:
        return Plan("pooled", f"the whole base is frozen: its pooled features are computed {when}", None, every_epoch)
    cut = FrozenBottom.cut_of(clf.base)
    if cut is None or not any(layer.weights for layer in clf.base.layers[:cut]):
        return Plan(None, f"no layer with weights of {clf.base.name} is frozen below the first that trains")
    per_image = MeasuringPasses.of(clf.model).frozen_bottom(cut).bytes_per_image
    kept = per_image * (train_count * (2 if every_epoch else 1) + val_count)
    megabytes = kept / 2**20
    below = f"layers 0-{cut - 1} of {clf.base.name} (below {clf.base.layers[cut].name})"
    if kept > BUDGET_BYTES:
        return Plan(None, f"the activations of {below} would take {megabytes:.0f} MiB, over {BUDGET_BYTES >> 20}")
    return Plan("bottom", f"{below} computed {when}, {megabytes:.1f} MiB", cut, every_epoch)


class EpochBatches(keras.callbacks.Callback):
    """The frozen inputs and labels of the current epoch's training batches, as the augmenting pipeline
    made them (in training order and batch composition), for the gap measurement at the epoch's end."""

    def __init__(self):
        super().__init__()
        self.batches: list[tuple[list[tf.Tensor], tf.Tensor]] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches = []

    def keep(self, y: tf.Tensor, *inputs: tf.Tensor) -> tf.Tensor:
        self.batches.append((list(inputs), y))
        return tf.constant(True)


@dataclass
class FrozenInputs:
    """Both splits' frozen inputs (pooled features or bottom activations), served like ``Datasets``
    serves images, and the model that maps them to logits over the classifier's own layers. With
    augmentation, the training batches are mapped through the frozen part every epoch (``augmented``)."""

    stage: Stage
    model: keras.Model
    train_images: tf.data.Dataset | None  # (inputs, label) per clean training image, in the split's order
    train_in_order: tf.data.Dataset | None  # the same, batched (None: augmented and not measured)
    val: tf.data.Dataset  # validation (inputs, label), batched
    data: Datasets
    augmented: tf.data.Dataset | None = None  # (augmented inputs, label) per batch, every epoch anew
    epoch_batches: EpochBatches | None = None  # what ``augmented`` produced this epoch, if kept

    def training_batches(self, phase: int) -> tf.data.Dataset:
        """Exactly the image pipeline's shuffle orders (same seed, phase and count)."""
        if self.augmented is not None:
            return self.augmented
        return self.data.reshuffled(self.train_images, phase)


def _computed_once(forward, batches: tf.data.Dataset) -> tf.data.Dataset:
    """Run ``forward`` (images -> list of tensors) once over ``batches``; (inputs, label) per image."""
    outputs, labels = [], []
    for x, y in batches:
        outputs.append(as_list(forward(x)))
        labels.append(y)
    columns = tuple(tf.concat(parts, 0) for parts in zip(*outputs, strict=True))
    inputs = columns[0] if len(columns) == 1 else columns
    return tf.data.Dataset.from_tensor_slices((inputs, tf.concat(labels, 0)))


def _head_model(clf: Classifier, the_plan: Plan) -> tuple[keras.Model, object]:
    """The part of the classifier above the frozen inputs, and the traced pass that computes them."""
    passes = MeasuringPasses.of(clf.model)
    if the_plan.stage == "pooled":
        inputs = keras.Input(shape=clf.pooled_shape, name="pooled_features")
        return keras.Model(inputs, clf.head(clf.dropout(inputs)), name="head_on_features"), passes.features_infer
    split = passes.split()
    assert split is not None and split.cut == the_plan.cut, "the trainable set changed after planning"
    specs = split.frozen.specs
    inputs = [keras.Input(shape=spec.shape[1:], name=f"frozen_bottom_{i}") for i, spec in enumerate(specs)]
    top = split.frozen.top
    # the base's own call, as build_classifier makes it: the same training flag reaches the same layers
    x = top(inputs) if clf.bn_training is None else top(inputs, training=clf.bn_training)
    outputs = clf.head(clf.dropout(clf.pool(x)))
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name="top_on_bottom"), split.bottom


def _augmenting(clf: Classifier, forward, data: Datasets, phase: int, kept: EpochBatches | None) -> tf.data.Dataset:
    """The phase's shuffled image batches, augmented and mapped through the frozen part as the pipeline
    runs: the model's own random layers draw from their seed states in the same order as in the model's
    call, so the draws are the same. The map runs in order (one draw after the other) on TF's full
    intra-op thread count (tf.data's default of one thread would halve the speed of the frozen pass)."""

    def augment_and_forward(x, y):
        inputs = as_list(forward(clf.augmentation(x, training=True)))
        if kept is not None:
            done = tf.py_function(kept.keep, [y, *inputs], Tout=tf.bool)
            with tf.control_dependencies([done]):
                inputs = [tf.identity(t) for t in inputs]
        return (inputs[0] if len(inputs) == 1 else tuple(inputs)), y

    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = (
        tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1
    )
    batches = data.reshuffled(data.train_images, phase)
    return batches.map(augment_and_forward).prefetch(tf.data.AUTOTUNE).with_options(options)


def compute(clf: Classifier, data: Datasets, the_plan: Plan, phase: int, measuring: bool) -> FrozenInputs:
    """Compute the splits' frozen inputs once (``the_plan`` from ``plan`` for the current trainable set);
    with augmentation, also the pipeline that computes the training batches' every epoch. The clean
    training images' are then needed only by the gap measurement: computed, and each epoch's augmented
    ones kept, only when ``measuring``."""
    assert the_plan.stage is not None, the_plan.reason
    model, forward = _head_model(clf, the_plan)
    val = _computed_once(forward, data.val).batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    train_images = train_in_order = None
    if measuring or not the_plan.every_epoch:
        train_images = _computed_once(forward, data.train_in_order).cache()
        train_in_order = train_images.batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    inputs = FrozenInputs(the_plan.stage, model, train_images, train_in_order, val, data)
    if the_plan.every_epoch:
        inputs.epoch_batches = EpochBatches() if measuring else None
        inputs.augmented = _augmenting(clf, forward, data, phase, inputs.epoch_batches)
    return inputs

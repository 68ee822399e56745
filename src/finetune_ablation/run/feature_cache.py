"""Frozen inputs (``cache.features``): with no augmentation, the frozen part of the base runs once per image.

A frozen layer without randomness computes the same output for an image in every epoch: a non-trainable
BatchNormalization uses its moving statistics whatever ``training`` says (docs/stack-facts.md K1). So
without augmentation, whatever lies below the first layer that trains or draws random numbers maps each
image to fixed values, and a phase can compute them once for both splits and train the rest on them:

- **pooled features** while the whole base is frozen and has no random layers (phase 1; phase 2 when
  ``fine_tune_at`` is past the end): the head is trained on the pooled base output;
- **bottom activations** while only the top is unfrozen (phase 2; or phase 1 of a base with random layers,
  such as EfficientNet's stochastic depth, cut below the first one): the unfrozen top, the pooling and the
  head are trained on the tensors that cross the cut (``passes.FrozenBottom``).

Either way the model trained is made of the very same layer objects (same weights, BN statistics and
dropout seed state), fed in the same shuffle orders as the images, and validation and the gap measurement
read the same inputs. Results equal the uncached path to float tolerance (tests/test_cache.py, metric by
metric). The inputs live in memory for one phase; past ``BUDGET_BYTES`` the phase runs on images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
import tensorflow as tf

from .augment import augments
from .data import Datasets
from .model import Classifier, has_random_layers
from .passes import FrozenBottom, MeasuringPasses, as_list

BUDGET_BYTES = 1 << 30  # both splits' frozen inputs, float32
Stage = Literal["pooled", "bottom"]


def why_base_varies(base: keras.Model) -> str | None:
    """None if ``base`` maps an image to the same features on every pass; otherwise why it does not."""
    if base.trainable_weights:
        return "the base is not fully frozen"
    if has_random_layers(base):
        return f"{base.name} has random layers (e.g. stochastic depth) that act in training mode"
    return None


@dataclass(frozen=True)
class Plan:
    """What a phase can compute once: ``stage`` (None: nothing, see ``reason``) and, for ``bottom``, where
    the base is cut."""

    stage: Stage | None
    reason: str
    cut: int | None = None


def plan(clf: Classifier, image_count: int) -> Plan:
    """Which frozen inputs are fixed for the phase about to run (the trainable set must be final)."""
    if augments(clf.augmentation):
        return Plan(None, "augmentation changes the images every epoch (use augment=none)")
    if why_base_varies(clf.base) is None:
        return Plan("pooled", "the whole base is frozen: its pooled features are computed once")
    cut = FrozenBottom.cut_of(clf.base)
    if cut is None or not any(layer.weights for layer in clf.base.layers[:cut]):
        return Plan(None, f"no layer with weights of {clf.base.name} is frozen below the first that trains")
    per_image = MeasuringPasses.of(clf).frozen_bottom(cut).bytes_per_image
    megabytes = per_image * image_count / 2**20
    below = f"layers 0-{cut - 1} of {clf.base.name} (below {clf.base.layers[cut].name})"
    if per_image * image_count > BUDGET_BYTES:
        return Plan(None, f"the activations of {below} would take {megabytes:.0f} MiB, over {BUDGET_BYTES >> 20}")
    return Plan("bottom", f"{below} computed once, {megabytes:.1f} MiB", cut)


@dataclass
class FrozenInputs:
    """Both splits' frozen inputs (pooled features or bottom activations), served like ``Datasets``
    serves images, and the model that maps them to logits over the classifier's own layers."""

    stage: Stage
    model: keras.Model
    train_images: tf.data.Dataset  # (inputs, label) per training image, in the split's order
    train_in_order: tf.data.Dataset  # the same, batched
    val: tf.data.Dataset  # validation (inputs, label), batched
    data: Datasets

    def training_batches(self, phase: int) -> tf.data.Dataset:
        """Exactly the image pipeline's shuffle orders (same seed, phase and count)."""
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
    passes = MeasuringPasses.of(clf)
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


def compute(clf: Classifier, data: Datasets, the_plan: Plan) -> FrozenInputs:
    """Compute both splits' frozen inputs once (``the_plan`` from ``plan`` for the current trainable set)."""
    assert the_plan.stage is not None, the_plan.reason
    model, forward = _head_model(clf, the_plan)
    train_images = _computed_once(forward, data.train_in_order).cache()
    val = _computed_once(forward, data.val).batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    train_in_order = train_images.batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    return FrozenInputs(the_plan.stage, model, train_images, train_in_order, val, data)

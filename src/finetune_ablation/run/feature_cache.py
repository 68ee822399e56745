"""Frozen-base features (``cache.features``): with no augmentation, phase 1 runs the base once per image.

While the whole base is frozen, every BatchNormalization uses its moving statistics, so without
augmentation (and without random layers inside the base, such as EfficientNet's stochastic depth) the
base maps an image to the same features in every epoch. Phase 1 then computes the pooled features of
both splits once and trains the head on them: a small model over the very same dropout and logits
layer objects (same weights, same dropout seed state), fed in the same shuffle orders as the images.
Everything phase 1 logs, the gap measurement included, reads these features; results equal the
uncached path to float tolerance."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from .augment import augments
from .data import Datasets
from .model import Classifier, has_random_layers
from .passes import MeasuringPasses


def why_base_varies(base: keras.Model) -> str | None:
    """None if ``base`` maps an image to the same features on every pass; otherwise why it does not."""
    if base.trainable_weights:
        return "the base is not fully frozen"
    if has_random_layers(base):
        return f"{base.name} has random layers (e.g. stochastic depth) that act in training mode"
    return None


def why_not_cacheable(clf: Classifier) -> str | None:
    """None if the frozen base's features are fixed per image; otherwise the reason they are not."""
    if augments(clf.augmentation):
        return "augmentation changes the images every epoch (use augment=none)"
    return why_base_varies(clf.base)


@dataclass
class FrozenFeatures:
    """The pooled frozen-base features of both splits, served like ``Datasets`` serves images."""

    model: keras.Model  # pooled features -> logits, sharing the classifier's dropout and logits layers
    train_images: tf.data.Dataset  # (features, label) per training image, in the split's order
    train_in_order: tf.data.Dataset  # the same, batched
    val: tf.data.Dataset  # validation (features, label), batched
    data: Datasets

    def training_batches(self, phase: int) -> tf.data.Dataset:
        """Exactly the image pipeline's shuffle orders (same seed, phase and count)."""
        return self.data.reshuffled(self.train_images, phase)


def _pooled(clf: Classifier, batches: tf.data.Dataset) -> tf.data.Dataset:
    """Run preprocess -> base -> pooling once over ``batches``; (features, label) per image, in order."""
    extract = MeasuringPasses.of(clf).features_infer  # the gap measurement's inference pass: traced once
    features, labels = [], []
    for x, y in batches:
        features.append(extract(x))
        labels.append(y)
    return tf.data.Dataset.from_tensor_slices((tf.concat(features, 0), tf.concat(labels, 0)))


def extract_features(clf: Classifier, data: Datasets) -> FrozenFeatures:
    """Compute both splits' features once (the base must be frozen: see ``why_not_cacheable``)."""
    train_images = _pooled(clf, data.train_in_order).cache()
    val = _pooled(clf, data.val).batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    inputs = keras.Input(shape=clf.pooled_shape, name="pooled_features")
    head = keras.Model(inputs, clf.head(clf.dropout(inputs)), name="head_on_features")
    train_in_order = train_images.batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    return FrozenFeatures(head, train_images, train_in_order, val, data)

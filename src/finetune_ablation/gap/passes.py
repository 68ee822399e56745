"""The traced forward passes the staged gap measurement runs (meter.GapMeter), traced once per model.

Tracing a ``tf.function`` through MobileNetV2's 154 layers costs seconds, so the passes are built once
per model (on its ``parts.Parts``) and shared by every phase's meter. A traced graph bakes in what Keras
reads at trace time:
the inference-mode pass, the augmentation, the head passes and the "no BatchNorm" pass (every BN set
non-trainable while it is traced) do not depend on which layers are trainable and are traced once; the
training-mode pass does (a trainable BN normalises with batch statistics, a frozen one with its moving
statistics), so it is traced once per set of trainable BN layers.

The frozen bottom. While the base is only partly unfrozen (phase 2), the layers below the first trainable
(or random) layer are frozen and deterministic: in training mode they compute exactly what they compute in
inference mode. ``FrozenBottom`` cuts the base there into a bottom model, from the image to the set of
tensors that cross the cut (MobileNetV2's residual adds can make that two tensors), and a top model, from
those tensors to the base's output. The measuring passes then run the bottom once per batch and only the
top once per condition: the same layer objects and operations, so the result is the full pass's up to
float rounding (TensorFlow's graph optimiser may fuse operations differently on either side of the cut;
measured: relative differences of 1e-7 in a loss). tests/test_measurement.py checks the measured
conditions against hand-built passes."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from .layers import is_dropout, walk_layers
from .parts import Parts


def _while_tracing(bns: list[keras.layers.BatchNormalization], attribute: str, value, trace):
    """Run ``trace`` with one BN attribute set: Keras reads it at trace time, not at run time."""
    saved = [getattr(bn, attribute) for bn in bns]
    for bn in bns:
        setattr(bn, attribute, value)
    try:
        return trace()
    finally:
        for bn, old in zip(bns, saved, strict=True):
            setattr(bn, attribute, old)


def as_list(value) -> list:
    """A model's output(s) as a list (Keras returns a lone tensor for a one-output model)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _varies(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` can compute something else in training mode than in inference mode, or change."""
    parts = [layer, *walk_layers(layer)]
    return bool(layer.trainable_weights) or any(
        is_dropout(p) or (isinstance(p, keras.layers.BatchNormalization) and p.trainable) for p in parts
    )


class FrozenBottom:
    """``base`` cut below its first trainable or random layer: ``bottom`` maps images to the tensors that
    cross the cut, ``top`` maps those tensors to the base's output (see the module docstring)."""

    def __init__(self, base: keras.Model, cut: int):
        self.cut = cut
        below = {id(layer) for layer in base.layers[:cut]}
        nodes = [node for depth in base._nodes_by_depth.values() for node in depth]  # this graph's calls only
        crossing: list = []
        for node in nodes:
            if id(node.operation) in below:
                continue
            for tensor in node.input_tensors:
                if id(tensor._keras_history.operation) in below and all(tensor is not c for c in crossing):
                    crossing.append(tensor)
        self.specs = [tf.TensorSpec(t.shape, tf.float32) for t in crossing]
        self.bottom = keras.Model(base.inputs, crossing, name=f"{base.name}_frozen_bottom")
        self.top = keras.Model(crossing, base.output, name=f"{base.name}_top")  # one tensor, as base returns

    @property
    def bytes_per_image(self) -> int:
        """Float32 bytes of one image's crossing tensors: what keeping the bottom's output costs."""
        return sum(4 * int(spec.shape[1:].num_elements()) for spec in self.specs)

    @staticmethod
    def cut_of(base: keras.Model) -> int | None:
        """Index of the first layer that varies; None when there is nothing frozen below it, or no such
        layer (a fully frozen base needs no cut: the whole base is the bottom)."""
        cut = next((i for i, layer in enumerate(base.layers) if _varies(layer)), None)
        return cut if cut else None


class MeasuringPasses:
    """Every traced pass of one model; ``of(model)`` returns the model's one instance (held by its
    ``Parts``, so it goes when the model goes)."""

    @classmethod
    def of(cls, model: keras.Model) -> MeasuringPasses:
        """Raises ``parts.NotStaged`` when the model cannot be cut into stages."""
        parts = Parts.of(model)
        if parts._measuring_passes is None:
            parts._measuring_passes = cls(parts)
        return parts._measuring_passes

    def __init__(self, parts: Parts):
        self.parts = parts
        self.bns = parts.body_batchnorms
        size = parts.model.input_shape[1:]
        # one trace per function: the batch dimension is free (the last batch is smaller)
        images = {"input_signature": [tf.TensorSpec((None, *size), parts.model.inputs[0].dtype)]}
        features = {"input_signature": [tf.TensorSpec((None, *parts.feature_shape), parts.feature_dtype)]}
        if parts.augment is not None:
            self.augment = tf.function(lambda x: parts.augment(x, training=True), **images)
        self.features_infer = tf.function(lambda x: parts.features(x, training=False), **images)
        self.features_no_bn = tf.function(lambda x: self._no_bn(parts.features, x), **images)
        self.head_dropout = tf.function(lambda f: parts.head_pass(f, training=True), **features)
        self.head_infer = tf.function(lambda f: parts.head_pass(f, training=False), **features)
        self._features_train: dict[tuple[bool, ...], tf.types.experimental.GenericFunction] = {}
        self._bottoms: dict[int, SplitPasses] = {}
        self._frozen: dict[int, FrozenBottom] = {}
        self._image_spec = images

    def _no_bn(self, forward, *inputs):
        """A non-trainable BN always uses its moving statistics; random layers stay in training mode."""
        return _while_tracing(self.bns, "trainable", False, lambda: forward(*inputs, training=True))

    def _train(self, forward, *inputs):
        """Batch statistics, but the moving ones stay as they are. A trainable BN called in training mode
        assigns ``moving * momentum + batch * (1 - momentum)`` (also outside ``fit``); with momentum 1
        that is the moving value itself, bit for bit, so every later pass of the loop (this batch's and
        the next batches') reads the end-of-epoch statistics that validation reads."""
        return _while_tracing(self.bns, "momentum", 1.0, lambda: forward(*inputs, training=True))

    def _trainable_key(self) -> tuple[bool, ...]:
        return tuple(bn.trainable for bn in self.bns)

    def features_train(self):
        """The training-mode pass for the BN layers trainable now (traced once per trainable set)."""
        key = self._trainable_key()
        if key not in self._features_train:
            self._features_train[key] = tf.function(lambda x: self._train(self.parts.features, x), **self._image_spec)
        return self._features_train[key]

    def frozen_bottom(self, cut: int) -> FrozenBottom:
        """The base cut at layer ``cut`` (built once per cut)."""
        if cut not in self._frozen:
            self._frozen[cut] = FrozenBottom(self.parts.base, cut)
        return self._frozen[cut]

    def split(self) -> SplitPasses | None:
        """The base cut at its frozen bottom as it is now, with its traced passes (None: no useful cut)."""
        parts = self.parts
        if parts.base is None:
            return None
        cut = FrozenBottom.cut_of(parts.base)
        if cut is None:
            return None
        if cut not in self._bottoms:
            frozen = self.frozen_bottom(cut)
            spec = {"input_signature": frozen.specs}
            self._bottoms[cut] = SplitPasses(
                cut,
                tf.function(lambda x: as_list(frozen.bottom(parts.preprocess(x), training=False)), **self._image_spec),
                {},
                tf.function(lambda *c: parts.postprocess(self._no_bn(frozen.top, list(c)), True), **spec),
                tf.function(lambda *c: parts.postprocess(frozen.top(list(c), training=False)), **spec),
                frozen,
            )
        split = self._bottoms[cut]
        key = self._trainable_key()
        if key not in split.top_train:
            top, spec = split.frozen.top, {"input_signature": split.frozen.specs}
            split.top_train[key] = tf.function(lambda *c: parts.postprocess(self._train(top, list(c)), True), **spec)
        return split


@dataclass
class SplitPasses:
    """The frozen bottom's pass (images -> crossing tensors) and the top's passes (crossing tensors ->
    pooled features) in each condition; ``top_train`` per set of trainable BN layers."""

    cut: int
    bottom: tf.types.experimental.GenericFunction
    top_train: dict
    top_no_bn: tf.types.experimental.GenericFunction
    top_infer: tf.types.experimental.GenericFunction
    frozen: FrozenBottom

    def train(self, bns: list[keras.layers.BatchNormalization]):
        return self.top_train[tuple(bn.trainable for bn in bns)]

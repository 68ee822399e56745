"""The gap measurement on any model: each condition is the whole model's own call, as ``fit`` makes it.

Used where a model cannot be cut into stages (``parts.NotStaged``: augmentation after layers with
weights, a subclassed model, several inputs), or where the Keras installed lets a ``training`` flag given
at construction win over ``fit``'s (``keras_probe.KerasBehaviour.fit_flag_reaches_every_layer``): then only the
model's own call, ``model(x, training=True)``, runs each layer as ``fit`` does. Each effect is switched off
by what Keras reads while a pass is traced, never by rebuilding the model:

    train_mode     model(x, training=True), every BatchNorm at momentum 1 (it assigns its own moving value)
    no_batchnorm   ... every BatchNorm non-trainable: it normalises with its moving statistics
    no_dropout     ... and every dropout and noise layer at rate 0
    train_clean    model(x, training=False): what validation computes

The three augmented passes start from the same seed states, so they see the same augmented images and
(train_mode and no_batchnorm) the same dropout masks. Given a ``TrainingOrder`` the epoch is replayed as on
the staged path (meter.py): the epoch's own batches, from the seed states captured as it began, so
``gap/lag`` is the weights' movement alone; else the split in its own order, from a stream per random layer
(``meter.own_seed_states``). Everything a pass can write is restored afterwards. It costs three or four
passes of the whole model per batch, where the staged path runs the frozen part once."""

from __future__ import annotations

import keras
import tensorflow as tf

from .decomposition import CONDITIONS
from .layers import (
    assign_values,
    augmentation_layers,
    batchnorm_layers,
    copy_values,
    dropout_layers,
    forward_state,
    seed_states,
)
from .meter import EpochDraws, TrainingOrder
from .passes import _while_tracing
from .scoring import Scorer, Tally, condition_results


def _rate_attribute(layer: keras.layers.Layer) -> str:
    return "stddev" if isinstance(layer, keras.layers.GaussianNoise) else "rate"


class WholeModelMeter:
    """Measures the four training-split conditions with whole-model passes (see the module docstring)."""

    def __init__(self, model: keras.Model, dataset: tf.data.Dataset, seed: int, order: TrainingOrder | None = None):
        self.model = model
        self.dataset = dataset
        self.seed = seed
        self.order = order
        self.replayed = False  # whether the last measure replayed the epoch's own batches and draws
        self.bns = batchnorm_layers(model)
        self.dropouts = dropout_layers(model)
        self.augments = bool(augmentation_layers(model))
        self.has_trainable_bn = any(bn.trainable for bn in self.bns)
        self._seed_states = seed_states(model)
        self.draws = EpochDraws(self._seed_states, seed, order)
        spec = {"reduce_retracing": True}
        self._train = tf.function(
            lambda x: _while_tracing(self.bns, "momentum", 1.0, lambda: model(x, training=True)), **spec
        )
        self._no_bn = tf.function(lambda x: self._moving(lambda: model(x, training=True)), **spec)
        self._no_dropout = tf.function(
            lambda x: self._moving(lambda: self._off(lambda: model(x, training=True))), **spec
        )
        self._clean = tf.function(lambda x: model(x, training=False), **spec)

    def _moving(self, trace):
        return _while_tracing(self.bns, "trainable", False, trace)

    def _off(self, trace):
        """Every dropout and noise layer at rate 0 while ``trace`` runs (Keras reads the rate at trace time)."""
        saved = [(layer, _rate_attribute(layer), getattr(layer, _rate_attribute(layer))) for layer in self.dropouts]
        for layer, attribute, _ in saved:
            setattr(layer, attribute, 0.0)
        try:
            return trace()
        finally:
            for layer, attribute, value in saved:
                setattr(layer, attribute, value)

    def epoch_begins(self, epoch: int) -> None:
        self.draws.epoch_begins(epoch)

    def measure(self, epoch: int, scorer: Scorer, corners: bool = False) -> dict[str, float]:
        """Accuracy, loss and correct count under each condition, with everything a pass can write restored."""
        if corners:
            raise ValueError("diagnostics.attribution=shapley needs the staged passes (a model parts.Parts can cut)")
        variables = forward_state(self.model)
        saved = copy_values(variables)
        index = self.draws.set_for(epoch)
        self.replayed = index is not None
        batches = self.order.epoch(index) if self.replayed else self.dataset
        tallies = {name: Tally() for name in CONDITIONS}
        try:
            for x, y in batches:
                draw = copy_values(self._seed_states)
                outputs = {"train_mode": self._train(x)}
                after = copy_values(self._seed_states)
                if self.has_trainable_bn:
                    assign_values(self._seed_states, draw)
                    outputs["no_batchnorm"] = self._no_bn(x)
                else:  # a frozen BatchNorm normalises with its moving statistics in training mode too
                    outputs["no_batchnorm"] = outputs["train_mode"]
                if self.dropouts:
                    assign_values(self._seed_states, draw)
                    outputs["no_dropout"] = self._no_dropout(x)
                else:
                    outputs["no_dropout"] = outputs["no_batchnorm"]
                assign_values(self._seed_states, after)  # the next batch draws as if one pass had run
                outputs["train_clean"] = self._clean(x) if self.augments else outputs["no_dropout"]
                for name in CONDITIONS:
                    tallies[name].add(scorer, outputs[name], y)
        finally:
            assign_values(variables, saved)
        return condition_results(tallies)

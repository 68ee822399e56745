"""What accuracy and loss mean for a model: the ones it was compiled with, applied per example.

The measured conditions must use Keras's own definitions, or the chain from Keras's ``accuracy`` to its
``val_accuracy`` would mix two meanings of a number: the course's ``metrics=['accuracy']`` on logits
thresholds them at 0.5, and the measurement does the same (``check`` names that as a finding).

The numbers are also averaged as Keras averages its own ``loss`` and accuracy over an epoch (``Tally``):
each batch's loss is the compiled loss's reduction of the batch, weighted by the batch size in a float32
``Mean``, and each example's accuracy value goes into another. A condition that computes what training
computed then gives Keras's number bit for bit: with the weights held still, ``gap/lag`` is exactly 0.
Sample and class weights are left out (Keras's ``loss`` includes neither when fit gets none, and the
measurement compares the examples themselves); so are penalties a model adds with ``add_loss`` or weight
regularizers, which Keras adds to its ``loss`` (they would show in ``gap/lag``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf


class ScoringError(ValueError):
    """The compiled model has no accuracy metric or loss the measurement can apply; says the fix."""


def compiled_metrics(model: keras.Model) -> list[keras.metrics.Metric]:
    """Every metric object the model's ``compile`` made, flattened (built after the first step)."""
    out: list[keras.metrics.Metric] = []
    for metric in model.metrics:
        inner = getattr(metric, "metrics", None)
        out.extend(inner if isinstance(inner, list) else [metric])
    return out


def _is_accuracy(metric: keras.metrics.Metric) -> bool:
    name = getattr(getattr(metric, "_fn", None), "__name__", "")
    return name.endswith("accuracy") and "top_k" not in name


def accuracy_metric(model: keras.Model) -> keras.metrics.Metric | None:
    """The model's compiled accuracy metric (Keras's ``'accuracy'``/``'acc'``, ``BinaryAccuracy``,
    ``CategoricalAccuracy``, ``SparseCategoricalAccuracy``, ``Accuracy``, whatever its name)."""
    return next((m for m in compiled_metrics(model) if _is_accuracy(m)), None)


def per_example_loss(loss) -> Callable | None:
    """The compiled loss as a function of (labels, outputs) returning one value per example; a name or
    a plain function is wrapped as ``compile`` wraps it (labels and outputs brought to the same rank)."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    return _same_rank(loss) if callable(loss) else None


def _same_rank(fn: Callable) -> Callable:
    """``fn`` on labels and outputs brought to the same rank, as ``compile`` does for a loss function:
    labels of shape (n,) against outputs (n, 1) become (n, 1)."""

    def call(y, outputs):
        y, outputs = tf.convert_to_tensor(y), tf.convert_to_tensor(outputs)
        if y.shape.rank == outputs.shape.rank - 1 and outputs.shape[-1] == 1:
            y = tf.expand_dims(y, -1) if y.shape.rank == 1 else y
            outputs = outputs if y.shape.rank == outputs.shape.rank else tf.squeeze(outputs, -1)
        elif outputs.shape.rank == y.shape.rank - 1 and y.shape[-1] == 1:
            y = tf.squeeze(y, -1)
        return fn(y, outputs)

    return call


def batch_loss(model: keras.Model) -> Callable | None:
    """The loss of one batch as the model's ``train_step`` computes it: its compiled loss (one output), or
    the compile argument reduced as Keras reduces it (the mean over the batch)."""
    compiled = getattr(model, "_compile_loss", None)
    if compiled is not None and getattr(compiled, "built", False):
        return lambda y, outputs: compiled(y, outputs)
    loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    if not callable(loss):
        return None
    same_rank = _same_rank(loss)
    return lambda y, outputs: keras.ops.mean(same_rank(y, outputs))  # as compile wraps a function: the mean


@dataclass(frozen=True)
class Scorer:
    """``correct(y, outputs)``: each example's accuracy value (1 or 0); ``loss(y, outputs)``: the batch's
    loss, as the model's compiled loss reduces it."""

    accuracy_name: str  # what Keras logs the accuracy as (``val_`` + it for validation)
    correct: Callable
    loss: Callable

    @classmethod
    def of(cls, model: keras.Model) -> Scorer:
        """From a compiled model after its first training step (when Keras has built its metrics)."""
        metric = accuracy_metric(model)
        if metric is None:
            raise ScoringError(
                f"{model.name} was compiled without an accuracy metric: compile with metrics=['accuracy'] "
                "(or keras.metrics.BinaryAccuracy(threshold=0.0) for logits)"
            )
        loss = batch_loss(model) if per_example_loss(getattr(model, "loss", None)) else None
        if loss is None:
            raise ScoringError(f"{model.name}'s loss is not one function (one output only): compile with one loss")
        fn, kwargs = metric._fn, dict(metric._fn_kwargs)
        return cls(metric.name, lambda y, out: fn(y, out, **kwargs), loss)


class Tally:
    """One condition's numbers over the batches of a split, averaged as Keras averages its epoch's
    ``loss`` and accuracy: two float32 ``keras.metrics.Mean``, one fed each batch's loss weighted by the
    batch size (the ``loss`` tracker of ``train_step``), one fed each example's accuracy value (the
    accuracy metric, a ``MeanMetricWrapper``). ``correct`` counts the correct examples, for intervals."""

    def __init__(self):
        self._loss = keras.metrics.Mean()
        self._accuracy = keras.metrics.Mean()
        self.correct = 0
        self.count = 0

    def add(self, scorer: Scorer, outputs: tf.Tensor, y: tf.Tensor) -> None:
        n = int(y.shape[0])
        self._loss.update_state(scorer.loss(y, outputs), sample_weight=n)
        values = scorer.correct(y, outputs)
        self._accuracy.update_state(values)
        self.correct += round(float(tf.reduce_sum(tf.cast(values, tf.float64))))
        self.count += n

    @property
    def accuracy(self) -> float:
        return float(self._accuracy.result())

    @property
    def loss(self) -> float:
        return float(self._loss.result())


def condition_results(tallies: dict[str, Tally]) -> dict[str, float]:
    """Each condition's accuracy, loss and correct count under the run record's names (``<condition>_*``),
    and the training split's size (``train_count``, from the clean condition)."""
    out: dict = {}
    for name, tally in tallies.items():
        out[f"{name}_accuracy"] = tally.accuracy
        out[f"{name}_loss"] = tally.loss
        out[f"{name}_correct"] = tally.correct
    out["train_count"] = tallies["train_clean"].count
    return out

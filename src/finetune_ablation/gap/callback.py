"""``GapCallback``: the gap measurement as a Keras callback, for any ``model.fit``, ``ablate``'s included.

At the end of an epoch it measures the training split under each condition and writes the conditions,
the gap components and the intervals into the epoch's ``logs`` under the names a run records
(``record.py``), so ``History``, ``CSVLogger``, TensorBoard and MLflow's ``MlflowCallback`` record them
when they come after it. See docs/notebook.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
import tensorflow as tf

from .decomposition import decompose
from .meter import GapMeter, KeptBatches, Stage
from .scoring import Scorer


@dataclass(frozen=True)
class Precomputed:
    """``train_data`` holds inputs precomputed through the model's frozen part (``ablate``'s frozen
    inputs): ``stage`` says which, ``epoch_batches`` the epoch's own augmented batches, if kept."""

    stage: Stage
    epoch_batches: KeptBatches | None = None


class GapCallback(keras.callbacks.Callback):
    """Why validation beats training, measured at every epoch's end of ``fit``.

    Args:
        train_data: the training split, batched (any order): a ``tf.data.Dataset`` of
            ``(images, labels)``.
        validation_size: the number of validation examples, for ``val_accuracy``'s 95% interval.
        seed: the seed of the measuring passes' own augmentation and dropout draws.
        when: ``"every_epoch"``, or ``"last_epoch"`` of each ``fit``.
        model: the model to measure, when ``fit`` trains another one on precomputed inputs.
        precomputed: what ``train_data`` holds when it is not images (see ``Precomputed``).
    """

    def __init__(
        self,
        train_data: tf.data.Dataset,
        *,
        validation_size: int | None = None,
        seed: int = 0,
        when: Literal["every_epoch", "last_epoch"] = "every_epoch",
        model: keras.Model | None = None,
        precomputed: Precomputed | None = None,
    ):
        super().__init__()
        self.train_data = train_data
        self.validation_size = validation_size
        self.seed = seed
        self.when = when
        self.measured_model = model
        self.precomputed = precomputed
        self.meter: GapMeter | None = None
        self._scorer: Scorer | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        """A new ``fit``: the trainable set is final now, so the meter is built for it; the metric and
        loss are read after the first step (when Keras has built them)."""
        stage = self.precomputed.stage if self.precomputed else None
        kept = self.precomputed.epoch_batches if self.precomputed else None
        self.meter = GapMeter(self.measured_model or self.model, self.train_data, self.seed, stage, kept)
        self._scorer = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        if self.when == "last_epoch" and epoch != self.params["epochs"] - 1:
            return
        if self._scorer is None:
            self._scorer = Scorer.of(self.model)
        measured = self.meter.measure(epoch, self._scorer)
        logs.update(decompose(logs, measured, self.validation_size, self._scorer.accuracy_name))

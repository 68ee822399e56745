"""``GapCallback``: the gap measurement as a Keras callback, for any ``model.fit``, ``ablate``'s included.

At the end of an epoch it measures the training split under each condition and writes the conditions,
the gap components and the intervals into the epoch's ``logs`` under the names a run records
(``record.py``), so ``History``, ``CSVLogger``, TensorBoard and MLflow's ``MlflowCallback`` (or autolog)
record them: Keras hands the same ``logs`` to every callback after this one. See docs/notebook.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import keras

from .. import record as rec
from .checks import not_keras3
from .data import as_split, split_labels
from .decomposition import ATTRIBUTIONS, chance_warning, decompose, majority_rate
from .keras_probe import probe
from .layers import augmentation_layers
from .meter import GapMeter, KeptBatches, Stage, TrainingOrder
from .parts import NotStaged, Parts
from .scoring import Scorer
from .sentence import gap_summary
from .whole import WholeModelMeter

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


@dataclass(frozen=True)
class Precomputed:
    """``train_data`` holds inputs precomputed through the model's frozen part (``ablate``'s frozen
    inputs, docs/caches.md): ``stage`` says which, ``epoch_batches`` holds the epoch's own augmented
    batches when the pipeline kept them."""

    stage: Stage
    epoch_batches: KeptBatches | None = None


class GapCallback(keras.callbacks.Callback):
    """Why validation beats training: the gap ``val_accuracy - accuracy`` split into lag, BatchNorm,
    dropout, augmentation and the split itself, measured at the end of every epoch of ``fit``.

    Put it before any callback that records ``logs`` (``CSVLogger``, ``MlflowCallback``, ...). Measuring
    changes nothing: the model's state and the data's shuffle order are as they would be without it.

    Args:
        train_data: the training split, batched, in any order: the ``tf.data.Dataset`` you pass to ``fit``
            (a dataset that reshuffles is read through an unshuffled copy), or a tuple ``(x, y)`` of arrays.
        validation_data: the validation split as you pass it to ``fit``: counted once, for
            ``val_accuracy``'s 95% interval and the at-chance check in ``summary()``.
        validation_size: the number of validation examples, when ``validation_data`` is not given.
        seed: the seed of the measuring passes' own augmentation and dropout draws (the same draws every
            run; a different seed is another sample of the augmentations).
        when: ``"every_epoch"`` or ``"last_epoch"`` (of each ``fit``).
        batch_size: the batch size for a ``train_data`` given as arrays.
        model: the model to measure when ``fit`` trains another one on precomputed inputs (``ablate``).
        precomputed: what ``train_data`` holds when it is not the model's inputs (``ablate``).
        verbose: print the one-line notes (what cannot be separated, and why).
        order: the batches ``fit`` reads, from a pipeline of their own (``ablate``): the measurement then
            replays each epoch's own batches, augmentations and dropout masks (meter.TrainingOrder); without
            it, it draws its own, and ``gap/lag`` holds the difference between two draws too.
        attribution: ``"ordered"`` (BatchNorm, dropout, augmentation removed in that order: an interaction
            lands in the one removed first) or ``"shapley"`` (each averaged over all removal orders; measures
            the 2x2x2 corners). See docs/gap-measurement.md.
    """

    def __init__(
        self,
        train_data,
        *,
        validation_data=None,
        validation_size: int | None = None,
        seed: int = 0,
        when: Literal["every_epoch", "last_epoch"] = "every_epoch",
        batch_size: int = 32,
        model: keras.Model | None = None,
        precomputed: Precomputed | None = None,
        verbose: bool = True,
        order: TrainingOrder | None = None,
        attribution: str = "ordered",
    ):
        super().__init__()
        if when not in ("every_epoch", "last_epoch"):
            raise ValueError(f"when={when!r}: use 'every_epoch' or 'last_epoch'")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution={attribution!r}: use {' or '.join(map(repr, ATTRIBUTIONS))}")
        self.train_data, note = (train_data, None) if precomputed else as_split(train_data, batch_size)
        self._validation, val_note = (
            (None, None) if validation_data is None else as_split(validation_data, batch_size, "validation_data")
        )
        self.validation_size = validation_size
        self.seed = seed
        self.when = when
        self.measured_model = model
        self.precomputed = precomputed
        self.verbose = verbose
        self.order = order
        self.attribution = attribution
        self.rows: list[dict] = []  # one per measured epoch: phase, epoch and the epoch's logs
        self.phase = 0  # fit calls so far: phase 2 is the second fit (fine-tuning)
        self.meter: GapMeter | WholeModelMeter | None = None
        self.how = ""  # which passes measure, and why
        self._scorer: Scorer | None = None
        self._val_labels = None
        self._said: set[str] = set()
        for line in (note, val_note):
            self._say(line)

    def _say(self, line: str | None) -> None:
        if line and self.verbose and line not in self._said:
            self._said.add(line)
            print(f"GapCallback: {line}")

    def set_model(self, model) -> None:
        """A Keras 2 (tf-keras) ``fit`` hands over its model here, before anything else: refuse it in one line."""
        other = not_keras3(model)
        if other is not None:
            raise TypeError(str(other))
        super().set_model(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        """A new ``fit``: the trainable set is final now, so the meter is built for it; the compiled metric
        and loss are read after the first step, when Keras has built them."""
        self.phase += 1
        self._scorer = None
        model = self.measured_model or self.model
        self.meter = self._meter(model)
        if not augmentation_layers(model) and not self.precomputed:
            self._say(
                f"{model.name} has no augmentation layers: augmentation done outside the model (e.g. in tf.data) "
                "cannot be separated; its effect stays in gap/lag (or gap/split if train_data is augmented)"
            )

    def _meter(self, model: keras.Model) -> GapMeter | WholeModelMeter:
        """The staged passes where they compute what fit computes, else the whole model per condition."""
        stage = self.precomputed.stage if self.precomputed else None
        kept = self.precomputed.epoch_batches if self.precomputed else None
        try:
            Parts.of(model)
        except NotStaged as exc:
            if self.precomputed:
                raise
            self.how = f"whole-model passes ({exc})"
            self._say(f"each condition runs the whole model: {exc}")
            return WholeModelMeter(model, self.train_data, self.seed, self.order)
        behaviour = probe()
        if not behaviour.fit_flag_reaches_every_layer and not self.precomputed:
            self.how = "whole-model passes (training flags given at construction win in this Keras)"
            self._say(f"each condition runs the whole model, as fit does: {behaviour.sentence()}")
            return WholeModelMeter(model, self.train_data, self.seed, self.order)
        self.how = "staged passes (the frozen part runs once per batch)"
        return GapMeter(model, self.train_data, self.seed, stage, kept, self.order)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.meter.epoch_begins(epoch)  # the seed states this epoch's training draws start from

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        if self.when == "last_epoch" and epoch != self.params["epochs"] - 1:
            return
        if self._scorer is None:
            self._scorer = Scorer.of(self.model)
        if f"val_{self._scorer.accuracy_name}" not in logs:
            self._say("fit has no validation_data this epoch: there is no gap to decompose")
            return
        measured = self.meter.measure(epoch, self._scorer, corners=self.attribution == "shapley")
        name = self._scorer.accuracy_name
        logs.update(decompose(logs, measured, self._validation_count(), name, self.attribution))
        self.rows.append({"phase": self.phase, "epoch": epoch, **{k: float(v) for k, v in logs.items()}})

    def _validation_count(self) -> int | None:
        if self._validation is not None and self._val_labels is None:
            self._val_labels = split_labels(self._validation)
        return len(self._val_labels) if self._val_labels is not None else self.validation_size

    def warning(self) -> str | None:
        """The at-chance warning for the last measured epoch (needs ``validation_data``)."""
        if not self.rows or self._val_labels is None:
            return None
        accuracy = f"val_{self._scorer.accuracy_name}" if self._scorer else rec.VAL_ACCURACY
        majority = majority_rate(self._val_labels.tolist())
        return chance_warning(self.rows[-1][accuracy], len(self._val_labels), majority)

    def summary(self) -> str:
        """The sentence for the last measured epoch of each ``fit`` (phase), printed and returned."""
        if not self.rows:
            text = "no epoch measured yet\n"
        else:
            labels = self._val_labels.tolist() if self._val_labels is not None else None
            text = gap_summary(
                self.rows,
                self.warning(),
                val_count=len(labels) if labels else None,
                majority=majority_rate(labels) if labels else None,
                replayed=self.meter.replayed,
                attribution=self.attribution,
            )
        print(text, end="")
        return text

    def plot(self) -> plt.Figure:
        """The gap figure: one stacked bar per measured epoch, a dotted line where the second fit starts."""
        import pandas as pd

        from .plot import gap_chart

        return gap_chart(pd.DataFrame(self.rows), self.warning())

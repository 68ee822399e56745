"""Why validation beats training, measured: an exact, telescoping decomposition of the gap per epoch
(config group ``diagnostics``).

At the end of an epoch the training split is passed through the model again with the end-of-epoch
weights, removing one training-time effect at a time:

    accuracy                Keras's number: averaged over the epoch while the weights moved
    train_mode_accuracy     full training-mode pass (augmentation, BN batch statistics, dropout)
    no_batchnorm_accuracy   ... with BatchNorm on its moving statistics
    no_dropout_accuracy     ... and every dropout layer off
    train_clean_accuracy    ... and no augmentation: the training split as validation sees data
    val_accuracy            Keras's validation number

Consecutive differences are the gap components; they sum exactly to ``val - train``. The same
is done for the loss. Every pass reads the end-of-epoch BN moving statistics (the training-mode pass
runs with momentum 1, so it assigns them their own value), and the train_mode and no_batchnorm passes
draw the same dropout and stochastic-depth masks, so ``gap/batchnorm`` is BatchNorm alone.
With frozen inputs (feature_cache) the augmented conditions are measured on the epoch's own training
batches, which the pipeline kept; otherwise the meter draws its own augmented batches from the training
split in order. Measuring changes nothing: every model variable (weights, BN moving statistics,
random-seed states) is restored afterwards, its own draws and the dropout masks use a fixed seed per epoch
(seed state ``i`` of the augmentation and head-dropout layers starts at ``(seed * 1_000_003 + epoch, i)``),
and the clean training split is read through its own unshuffled pipeline. See docs/gap-measurement.md."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from scipy.stats import binomtest

from .. import record as rec
from ..config import DiagnosticsLevel
from ..console import points
from .augment import augments
from .feature_cache import EpochBatches, Stage, why_base_varies
from .model import Classifier, assign_values, batchnorm_layers, copy_values, forward_state, has_random_layers
from .passes import MeasuringPasses, as_list

CONDITIONS = ("train_mode", "no_batchnorm", "no_dropout", "train_clean")
# component (named in record.GAP_COMPONENTS) -> (minuend, subtrahend), in the order the effects are removed
COMPONENTS = dict(
    zip(
        rec.GAP_COMPONENTS,
        (
            ("train_mode", "keras_train"),  # lag
            ("no_batchnorm", "train_mode"),  # batchnorm
            ("no_dropout", "no_batchnorm"),  # dropout
            ("train_clean", "no_dropout"),  # augmentation
            ("keras_val", "train_clean"),  # split
        ),
        strict=True,
    )
)


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def majority_rate(labels: list[str]) -> float:
    """Share of the most common class: the accuracy of always guessing it."""
    return max(labels.count(name) for name in set(labels)) / len(labels)


def chance_warning(val_accuracy: float, val_count: int, majority: float) -> str | None:
    """A warning when the validation accuracy's 95% Wilson interval reaches down to the majority-class
    rate: such a model is not distinguishably better than guessing the larger class (or is worse), so its
    gap components are noise. The study report applies the same rule (report_design.run_at_chance)."""
    low, high = wilson_interval(round(val_accuracy * val_count), val_count)
    if low > majority:
        return None
    return (
        f"AT CHANCE: val_accuracy {val_accuracy:.3f} (95% interval {low:.3f}-{high:.3f}, {val_count} images) "
        f"is not distinguishably above the majority-class rate {majority:.3f}. The model explains nothing "
        "yet, and the gap components below are noise."
    )


@dataclass
class _Totals:
    correct: int = 0
    loss_sum: float = 0.0


class GapMeter:
    """Measures the four training-split conditions for one phase. Build one per phase, after the
    trainable set is final: its passes (passes.MeasuringPasses, traced once per run) are picked for the
    BatchNorm layers trainable now.

    ``dataset`` is the training split in order: image batches, or batches of the frozen inputs that
    ``feature_cache.compute`` made once (``stage``): the frozen base's pooled features, which all four
    conditions share, or the frozen bottom's activations, which the top then maps per condition.
    When the base has a frozen bottom (phase 2), the bottom runs once per batch and only the top runs per
    condition; the clean images' bottom activations are computed once per phase if they fit in
    ``clean_bottom_budget`` bytes. With augmentation and frozen inputs, ``epoch_batches`` holds the
    augmented inputs the epoch's training batches were made of: the augmented conditions are measured on
    those very batches (same images, draws and batch composition), and the frozen part does not run again."""

    clean_bottom_budget = 512 * 2**20

    def __init__(
        self,
        clf: Classifier,
        dataset: tf.data.Dataset,
        seed: int,
        stage: Stage | None = None,
        epoch_batches: EpochBatches | None = None,
    ):
        self.clf = clf
        self.dataset = dataset
        self.seed = seed
        self.stage = stage
        self.epoch_batches = epoch_batches
        self.passes = MeasuringPasses.of(clf)
        self.bns = batchnorm_layers(clf.base)
        self.has_trainable_bn = any(bn.trainable for bn in self.bns)
        self.base_is_stochastic = has_random_layers(clf.base)
        self.augments = augments(clf.augmentation)
        self._split = None if stage == "pooled" else self.passes.split()
        # Without trainable BN and random layers, training mode computes what inference mode computes:
        # one traced pass serves both (phase 1; phase 2 with freeze_bn=true).
        if self.has_trainable_bn or self.base_is_stochastic:
            self._features_train = self.passes.features_train()
            self._top_train = self._split.train(self.bns) if self._split else None
        else:
            self._features_train = self.passes.features_infer
            self._top_train = self._split.top_infer if self._split else None
        # A frozen, deterministic base maps a clean image to the same features all phase: measure once.
        self._fixed_clean = why_base_varies(clf.base) is None
        self._clean_features: list[tf.Tensor] = []
        # and a frozen bottom maps it to the same activations all phase
        self._clean_bottom: list[list[tf.Tensor]] = []
        self._seed_states = [
            v for layer in (clf.augmentation, clf.dropout) for v in layer.variables if "seed" in v.path
        ]
        self._dropout_seeds = [v for v in clf.dropout.variables if "seed" in v.path]
        # e.g. EfficientNet's stochastic depth: the same masks in the train_mode and no_batchnorm passes
        self._base_seeds = [v for v in clf.base.variables if "seed" in v.path]

    def _whole_base(self, augmented):
        """train_mode, no_batchnorm and no_dropout features, each pass through the whole base."""
        passes = self.passes
        mask_state = copy_values(self._base_seeds)
        f_train = self._features_train(augmented)
        if self.has_trainable_bn:
            assign_values(self._base_seeds, mask_state)  # only BatchNorm differs between the two
            f_no_bn = passes.features_no_bn(augmented)
        else:
            f_no_bn = f_train
        f_no_drop = passes.features_infer(augmented) if self.base_is_stochastic else f_no_bn
        return f_train, f_no_bn, f_no_drop

    def _split_base(self, augmented):
        """The same three, with the frozen bottom run once and only the top per condition."""
        return self._tops(self._split.bottom(augmented))

    def _tops(self, crossing):
        """The same three from the frozen bottom's activations: only the top runs per condition."""
        split = self._split
        mask_state = copy_values(self._base_seeds)
        f_train = self._top_train(*crossing)
        if self.has_trainable_bn:
            assign_values(self._base_seeds, mask_state)
            f_no_bn = split.top_no_bn(*crossing)
        else:
            f_no_bn = f_train
        f_no_drop = split.top_infer(*crossing) if self.base_is_stochastic else f_no_bn
        return f_train, f_no_bn, f_no_drop

    def _clean(self, x, index: int, reuse: bool, computed: list) -> tf.Tensor:
        """Inference-mode features of the clean batch, from what an earlier epoch of the phase kept."""
        if self._fixed_clean:
            if reuse:
                return self._clean_features[index]
            f_clean = self.passes.features_infer(x)
            computed.append(f_clean)
            return f_clean
        if self._split is None:
            return self.passes.features_infer(x)
        if reuse:
            crossing = self._clean_bottom[index]
        else:
            crossing = self._split.bottom(x)
            computed.append(crossing)
            self._kept_bytes += sum(int(t.shape.num_elements()) * t.dtype.size for t in crossing)
            if self._kept_bytes > self.clean_bottom_budget:  # too large to keep: recompute every epoch
                computed.clear()
        return self._split.top_infer(*crossing)

    def _conditions(self):
        """Per batch: labels and the pooled features under train_mode, no_batchnorm and no_dropout, then
        labels and clean features (the same images, except when measuring the epoch's own batches)."""
        if self.epoch_batches is not None:
            yield from self._epoch_conditions()
            return
        kept = self._clean_features if self._fixed_clean else self._clean_bottom
        reuse = bool(kept)
        computed: list = []
        self._kept_bytes = 0
        for index, (x, y) in enumerate(self.dataset):
            if self.stage == "pooled":  # a frozen, deterministic base on un-augmented images: one feature set
                yield y, x, x, x, y, x
                continue
            if self.stage == "bottom":  # un-augmented images: the clean pass is the no-dropout pass
                f_train, f_no_bn, f_no_drop = self._tops(as_list(x))
                yield y, f_train, f_no_bn, f_no_drop, y, f_no_drop
                continue
            augmented = self.passes.augment(x) if self.augments else x
            f_train, f_no_bn, f_no_drop = (self._split_base if self._split else self._whole_base)(augmented)
            f_clean = self._clean(x, index, reuse, computed) if self.augments else f_no_drop
            yield y, f_train, f_no_bn, f_no_drop, y, f_clean
        if not reuse and self._kept_bytes <= self.clean_bottom_budget:  # kept only once complete
            kept.extend(computed)

    def _epoch_conditions(self):
        """The augmented conditions from the epoch's own training batches, paired with the clean ones'
        frozen inputs (computed once): both are the whole split, batched alike."""
        batches = self.epoch_batches.batches
        assert batches, "the epoch's training batches were not kept"
        for (inputs, y), (clean, y_clean) in zip(batches, self.dataset, strict=True):
            if self.stage == "pooled":  # the whole base frozen and deterministic: one feature set
                yield y, inputs[0], inputs[0], inputs[0], y_clean, clean
                continue
            f_train, f_no_bn, f_no_drop = self._tops(inputs)
            yield y, f_train, f_no_bn, f_no_drop, y_clean, self._split.top_infer(*as_list(clean))

    def _score(self, totals: _Totals, logits: tf.Tensor, y: tf.Tensor) -> None:
        if self.clf.binary:
            correct = tf.cast(logits > 0.0, y.dtype) == y
            losses = keras.losses.binary_crossentropy(y, logits, from_logits=True)
        else:
            correct = tf.argmax(logits, axis=-1, output_type=y.dtype) == y
            losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        totals.correct += int(tf.reduce_sum(tf.cast(correct, tf.int32)))
        totals.loss_sum += float(tf.reduce_sum(tf.cast(losses, tf.float64)))

    def measure(self, epoch: int) -> dict[str, float]:
        """Accuracy, loss and correct count under each condition, with everything a pass can write restored."""
        variables = forward_state(self.clf.model)
        saved = copy_values(variables)
        for i, state in enumerate(self._seed_states):  # a fixed, reproducible draw per epoch
            state.assign(np.array([self.seed * 1_000_003 + epoch, i], dtype=state.dtype))
        totals = {name: _Totals() for name in CONDITIONS}
        count = 0
        try:
            for y, f_train, f_no_bn, f_no_drop, y_clean, f_clean in self._conditions():
                count += int(y.shape[0])
                # the same dropout mask for both dropout-on passes, so only BatchNorm differs
                dropout_state = copy_values(self._dropout_seeds)
                self._score(totals["train_mode"], self.passes.head_dropout(f_train), y)
                assign_values(self._dropout_seeds, dropout_state)
                self._score(totals["no_batchnorm"], self.passes.head_dropout(f_no_bn), y)
                self._score(totals["no_dropout"], self.passes.head_infer(f_no_drop), y)
                self._score(totals["train_clean"], self.passes.head_infer(f_clean), y_clean)
        finally:
            assign_values(variables, saved)
        out: dict[str, float] = {}
        for name, t in totals.items():
            out[f"{name}_accuracy"] = t.correct / count
            out[f"{name}_loss"] = t.loss_sum / count
            out[f"{name}_correct"] = t.correct
        out["train_count"] = count
        return out


def decompose(keras_logs: dict[str, float], measured: dict[str, float], val_count: int) -> dict[str, float]:
    """Gap components for accuracy (``gap/*``) and loss (``gap_loss/*``), plus Wilson intervals."""
    out: dict[str, float] = {}
    for name in CONDITIONS:
        out[f"{name}_accuracy"] = measured[f"{name}_accuracy"]
        out[f"{name}_loss"] = measured[f"{name}_loss"]
    for metric, prefix in (("accuracy", rec.GAP_PREFIX), ("loss", rec.GAP_LOSS_PREFIX)):
        values = {name: measured[f"{name}_{metric}"] for name in CONDITIONS}
        values["keras_train"] = float(keras_logs[metric])
        values["keras_val"] = float(keras_logs[f"val_{metric}"])
        out[f"{prefix}total"] = values["keras_val"] - values["keras_train"]
        for component, (plus, minus) in COMPONENTS.items():
            out[f"{prefix}{component}"] = values[plus] - values[minus]
    val_correct = round(float(keras_logs[rec.VAL_ACCURACY]) * val_count)
    for accuracy, (correct, count) in (
        (rec.VAL_ACCURACY, (val_correct, val_count)),
        (rec.TRAIN_CLEAN_ACCURACY, (int(measured["train_clean_correct"]), int(measured["train_count"]))),
    ):
        out.update(zip(rec.interval_metrics(accuracy), wilson_interval(correct, count), strict=True))
    return out


class GapDiagnostics(keras.callbacks.Callback):
    """Adds the measured conditions and gap components to the epoch's logs (before the MLflow logger)."""

    def __init__(self, meter: GapMeter, level: DiagnosticsLevel, last_epoch: int, val_count: int):
        super().__init__()
        self.meter = meter
        self.level = level
        self.last_epoch = last_epoch
        self.val_count = val_count

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or self.level == DiagnosticsLevel.off:
            return
        if self.level == DiagnosticsLevel.final and epoch != self.last_epoch:
            return
        logs.update(decompose(logs, self.meter.measure(epoch), self.val_count))


def gap_sentence(row: dict[str, float]) -> str:
    """One plain sentence: the total gap and its components by size, in accuracy points."""
    total = points(row[rec.GAP_TOTAL])  # the sign as written: a total that rounds to 0.0 reads as +0.0
    parts = sorted(COMPONENTS, key=lambda c: -abs(row[rec.gap_metric(c)]))
    listed = ", ".join(f"{c} {points(row[rec.gap_metric(c)])}" for c in parts)
    leader = "training beats validation" if total.startswith("-") else "validation beats training"
    lead = f"{leader} by {total[1:]} points"
    return f"{lead}: {listed}"


def gap_summary(rows: list[dict], warning: str | None = None) -> str:
    """The sentence for the last measured epoch of each phase (``gap_summary.txt``), after the
    at-chance ``warning`` if there is one."""
    lines = [warning, ""] if warning else []
    for phase in sorted({r["phase"] for r in rows}):
        measured = [r for r in rows if r["phase"] == phase and rec.GAP_TOTAL in r]
        if measured:
            last = measured[-1]
            # epochs counted from 1 as the console prints them; MLflow's step is the epoch index
            lines.append(f"phase {phase}, epoch {last['epoch'] + 1} (step {last['epoch']}): {gap_sentence(last)}")
    if not any(line.startswith("phase ") for line in lines):
        lines.append("no gap measurement (diagnostics.level=off)")
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append(
        "lag = epoch-averaged train metric vs end-of-epoch weights; batchnorm = batch vs moving statistics; "
        "dropout = dropout on vs off; augmentation = augmented vs clean images; split = validation vs "
        "clean training split (the real generalisation gap)."
    )
    return "\n".join(lines) + "\n"

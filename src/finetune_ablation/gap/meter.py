"""The staged gap measurement: at the end of an epoch the training split is passed through the model
again with the end-of-epoch weights, once per condition (decomposition.CONDITIONS), removing one
training-time effect at a time.

Every pass reads the end-of-epoch BN moving statistics (the training-mode pass runs with momentum 1, so it
assigns them their own value), and the train_mode and no_batchnorm passes draw the same dropout and
stochastic-depth masks, so ``gap/batchnorm`` is BatchNorm alone. With frozen inputs (the suite's
``cache.features``) the augmented conditions are measured on the epoch's own training batches, which the
pipeline kept; otherwise the meter draws its own augmented batches from the training split in order.
Measuring changes nothing: every model variable (weights, BN moving statistics, random-seed states) is
restored afterwards, its own draws and the dropout masks use a fixed seed per epoch (seed state ``i`` of
the augmentation and head-dropout layers starts at ``(seed * 1_000_003 + epoch, i)``), and the training
split is read in an order of its own. See docs/gap-measurement.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import keras
import numpy as np
import tensorflow as tf

from .decomposition import CONDITIONS
from .layers import assign_values, copy_values, forward_state
from .passes import MeasuringPasses, as_list
from .scoring import Scorer

# What a dataset of precomputed inputs holds (the suite's frozen inputs): the head's input ("pooled"
# features of a frozen, deterministic body) or the tensors that cross the base's frozen-bottom cut.
Stage = Literal["pooled", "bottom"]


class KeptBatches(Protocol):
    """The epoch's own training batches as the pipeline made them: ``batches`` is a list of
    (list of input tensors, labels), in training order."""

    batches: list


@dataclass
class _Totals:
    correct: int = 0
    loss_sum: float = 0.0


class GapMeter:
    """Measures the four training-split conditions for one phase. Build one per phase, after the
    trainable set is final: its passes (passes.MeasuringPasses, traced once per model) are picked for the
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
        model: keras.Model,
        dataset: tf.data.Dataset,
        seed: int,
        stage: Stage | None = None,
        epoch_batches: KeptBatches | None = None,
    ):
        self.model = model
        self.dataset = dataset
        self.seed = seed
        self.stage = stage
        self.epoch_batches = epoch_batches
        self.passes = MeasuringPasses.of(model)
        parts = self.passes.parts
        self.bns = parts.body_batchnorms
        self.has_trainable_bn = any(bn.trainable for bn in self.bns)
        self.base_is_stochastic = parts.body_is_stochastic
        self.augments = parts.augments
        self._split = None if stage == "pooled" else self.passes.split()
        # Without trainable BN and random layers, training mode computes what inference mode computes:
        # one traced pass serves both (phase 1; phase 2 with freeze_bn=true).
        if self.has_trainable_bn or self.base_is_stochastic:
            self._features_train = self.passes.features_train()
            self._top_train = self._split.train(self.bns) if self._split else None
        else:
            self._features_train = self.passes.features_infer
            self._top_train = self._split.top_infer if self._split else None
        # A frozen, deterministic body maps a clean image to the same features all phase: measure once.
        self._fixed_clean = parts.body_is_fixed
        self._clean_features: list[tf.Tensor] = []
        # and a frozen bottom maps it to the same activations all phase
        self._clean_bottom: list[list[tf.Tensor]] = []
        self._dropout_seeds = parts.head_seed_states()
        self._seed_states = parts.augment_seed_states() + self._dropout_seeds
        # e.g. EfficientNet's stochastic depth: the same masks in the train_mode and no_batchnorm passes
        self._base_seeds = parts.body_seed_states()

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

    @staticmethod
    def _score(scorer: Scorer, totals: _Totals, outputs: tf.Tensor, y: tf.Tensor) -> None:
        correct, losses = scorer.per_example(y, outputs)
        totals.correct += correct
        totals.loss_sum += float(tf.reduce_sum(tf.cast(losses, tf.float64)))

    def measure(self, epoch: int, scorer: Scorer) -> dict[str, float]:
        """Accuracy, loss and correct count under each condition (as ``scorer`` defines them: the compiled
        metric and loss), with everything a pass can write restored."""
        variables = forward_state(self.model)
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
                self._score(scorer, totals["train_mode"], self.passes.head_dropout(f_train), y)
                assign_values(self._dropout_seeds, dropout_state)
                self._score(scorer, totals["no_batchnorm"], self.passes.head_dropout(f_no_bn), y)
                self._score(scorer, totals["no_dropout"], self.passes.head_infer(f_no_drop), y)
                self._score(scorer, totals["train_clean"], self.passes.head_infer(f_clean), y_clean)
        finally:
            assign_values(variables, saved)
        out: dict[str, float] = {}
        for name, t in totals.items():
            out[f"{name}_accuracy"] = t.correct / count
            out[f"{name}_loss"] = t.loss_sum / count
            out[f"{name}_correct"] = t.correct
        out["train_count"] = count
        return out

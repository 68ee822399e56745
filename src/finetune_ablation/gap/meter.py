"""The staged gap measurement: at the end of an epoch the epoch's training batches are passed through the
model again with the end-of-epoch weights, once per condition (decomposition.CONDITIONS), removing one
training-time effect at a time.

**Replaying the epoch.** ``gap/lag`` must be the weights' movement alone, so the training-mode pass
computes what training computed, at the end-of-epoch weights: the same examples in the same batches and
order (``TrainingOrder``: the phase's pipeline built anew, seeded alike), the same augmentation draws and
the same dropout and stochastic-depth masks (every random layer's seed state as it stood when the epoch
began, captured by ``epoch_begins``; Keras's random layers draw statelessly from that state, one step per
call), averaged as Keras averages its ``loss`` and accuracy (scoring.Tally). With the weights held still,
``gap/lag`` is exactly 0. With frozen inputs and augmentation (the suite's ``cache.features``) the
augmented inputs of the epoch are the ones the pipeline kept (``epoch_batches``); only the dropout masks
are replayed. Every condition is measured on these same batches, the clean one on their un-augmented
images.

Without a ``TrainingOrder`` (or before ``epoch_begins`` was called for the epoch) the meter cannot replay:
it reads the split in its own order and draws its own augmentations and masks from a stream per random
layer that no other layer's stream overlaps (``own_seed_states``); ``gap/lag`` then also holds the
difference between two draws (docs/gap-measurement.md). On either path the train_mode and no_batchnorm
passes use the same dropout and stochastic-depth masks, so ``gap/batchnorm`` is BatchNorm alone; every pass
reads the end-of-epoch BN moving statistics (the training-mode pass runs with momentum 1, so it assigns
them their own value); and everything a pass can write (BN moving statistics, seed states) is restored
afterwards, so measuring changes nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import keras
import numpy as np
import tensorflow as tf

from .decomposition import CONDITIONS, EFFECTS
from .layers import assign_values, copy_values, forward_state
from .passes import MeasuringPasses, as_list
from .scoring import Scorer, Tally, condition_results

# What a dataset of precomputed inputs holds (the suite's frozen inputs): the head's input ("pooled"
# features of a frozen, deterministic body) or the tensors that cross the base's frozen-bottom cut.
Stage = Literal["pooled", "bottom"]

# The 2x2x2 corners by the effects removed: the chain of CONDITIONS removes BatchNorm, then dropout, then
# augmentation; the other four corners complete the cube.
_BN, _DROP_EFFECT, _AUG_EFFECT = EFFECTS
CHAIN_CORNERS = (frozenset(), frozenset({_BN}), frozenset({_BN, _DROP_EFFECT}), frozenset(EFFECTS))
DROP, AUG = frozenset({_DROP_EFFECT}), frozenset({_AUG_EFFECT})
BN_AUG, DROP_AUG = frozenset({_BN, _AUG_EFFECT}), frozenset({_DROP_EFFECT, _AUG_EFFECT})
EXTRA_CORNERS = (DROP, AUG, BN_AUG, DROP_AUG)

# Keras's TensorFlow backend takes a seed state modulo this (random._cast_seed) before every draw.
SEED_MODULUS = 2**31 - 2


class KeptBatches(Protocol):
    """The epoch's own training batches as the pipeline made them: ``batches`` is a list of
    (list of input tensors, labels), in training order."""

    batches: list


@dataclass
class TrainingOrder:
    """The batches ``fit`` reads in one phase, un-augmented, from a pipeline of their own: ``batches()``
    builds the phase's training pipeline anew (the same shuffle seeds, so the same orders epoch after
    epoch, and no state shared with the pipeline ``fit`` iterates); ``steps`` batches make an epoch."""

    batches: Callable[[], tf.data.Dataset]
    steps: int
    _iterator: Iterator | None = field(default=None, repr=False)
    _next: int = 0

    def epoch(self, k: int) -> Iterator:
        """The batches of the phase's ``k``-th epoch (from 0), read once: a later epoch continues the
        same iterator, an earlier one starts a new pipeline."""
        if self._iterator is None or k < self._next:
            self._iterator, self._next = iter(self.batches().repeat()), 0
        for _ in range((k - self._next) * self.steps):  # epochs not measured (diagnostics=final)
            next(self._iterator)
        self._next = k + 1
        return itertools.islice(self._iterator, self.steps)


def own_seed_states(seed: int, epoch: int, count: int) -> list[np.ndarray]:
    """Seed states for ``count`` random layers that draw on their own: one stream per layer. Keras
    advances a state's second element by one per draw, so layer ``i`` starts at ``(k + i, 0)``: no two
    layers' streams can meet however many batches an epoch has; ``k`` mixes the seed and the epoch."""
    k = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return [np.array([(k + i) % SEED_MODULUS, 0], dtype=np.int64) for i in range(count)]


class EpochDraws:
    """The draws a measured epoch uses, for either meter: training's own (the seed states captured as the
    epoch began, when the training order is known, so the epoch is replayed) or the meter's own stream."""

    def __init__(self, variables: list, seed: int, order: TrainingOrder | None):
        self.variables, self.seed, self.order = variables, seed, order
        self._first_epoch: int | None = None
        self._epoch_start: tuple[int, list[np.ndarray]] | None = None

    def epoch_begins(self, epoch: int) -> None:
        """Capture the seed states training's draws of this epoch start from."""
        if self._first_epoch is None:
            self._first_epoch = epoch
        self._epoch_start = (epoch, copy_values(self.variables))

    def set_for(self, epoch: int) -> int | None:
        """Set the seed states the measurement of ``epoch`` draws from. Returns the epoch's index in the
        phase when it is replayed (training's batches and draws), None when the meter draws its own."""
        if self.order is not None and self._epoch_start is not None and self._epoch_start[0] == epoch:
            assign_values(self.variables, self._epoch_start[1])
            return epoch - self._first_epoch
        assign_values(self.variables, own_seed_states(self.seed, epoch, len(self.variables)))
        return None


class GapMeter:
    """Measures the four training-split conditions for one phase. Build one per phase, after the
    trainable set is final: its passes (passes.MeasuringPasses, traced once per model) are picked for the
    BatchNorm layers trainable now. Call ``epoch_begins`` as every epoch begins (``GapCallback`` does), and
    ``measure`` at its end.

    ``dataset`` is the training split in order: image batches, or batches of the frozen inputs that
    ``feature_cache.compute`` made once (``stage``): the frozen base's pooled features, which all four
    conditions share, or the frozen bottom's activations, which the top then maps per condition.
    ``order`` serves the same elements in the epoch's training order (see the module docstring); with
    augmentation and frozen inputs, ``epoch_batches`` holds the augmented inputs the epoch's training
    batches were made of, and the frozen part does not run again. When the base has a frozen bottom
    (phase 2), the bottom runs once per batch and only the top runs per condition."""

    clean_bottom_budget = 512 * 2**20

    def __init__(
        self,
        model: keras.Model,
        dataset: tf.data.Dataset,
        seed: int,
        stage: Stage | None = None,
        epoch_batches: KeptBatches | None = None,
        order: TrainingOrder | None = None,
    ):
        self.model = model
        self.dataset = dataset
        self.seed = seed
        self.stage = stage
        self.epoch_batches = epoch_batches
        self.order = order
        self.passes = MeasuringPasses.of(model)
        parts = self.passes.parts
        self.bns = parts.body_batchnorms
        self.has_trainable_bn = any(bn.trainable for bn in self.bns)
        self.base_is_stochastic = parts.body_is_stochastic
        self.augments = parts.augments and stage is None  # frozen inputs arrive augmented, or not at all
        self._split = None if stage == "pooled" else self.passes.split()
        # Without trainable BN and random layers, training mode computes what inference mode computes:
        # one traced pass serves both (phase 1; phase 2 with freeze_bn=true).
        if self.has_trainable_bn or self.base_is_stochastic:
            self._features_train = self.passes.features_train()
            self._top_train = self._split.train(self.bns) if self._split else None
        else:
            self._features_train = self.passes.features_infer
            self._top_train = self._split.top_infer if self._split else None
        # A frozen, deterministic body maps a clean image to the same features all phase: measured once
        # while the split is read in its own order.
        self._fixed_clean = parts.body_is_fixed
        self._clean_features: list[tf.Tensor] = []
        # and a frozen bottom maps it to the same activations all phase
        self._clean_bottom: list[list[tf.Tensor]] = []
        self._dropout_seeds = parts.head_seed_states()
        # e.g. EfficientNet's stochastic depth: the same masks in the train_mode and no_batchnorm passes
        self._base_seeds = parts.body_seed_states()
        augment_seeds = parts.augment_seed_states()
        # the draws the meter makes: frozen inputs come augmented already
        self._drawn = (augment_seeds if self.augments else []) + self._base_seeds + self._dropout_seeds
        # What measuring may write, restored after. Frozen inputs are augmented by the data pipeline, which
        # may be drawing the next epoch's augmentations while the meter runs: their seeds are left alone.
        others = {id(v) for v in augment_seeds} if stage is not None else set()
        self._written = [v for v in forward_state(model) if id(v) not in others]
        self.draws = EpochDraws(self._drawn, seed, order)
        self.replayed = False  # whether the last measure replayed the epoch's own batches and draws

    def epoch_begins(self, epoch: int) -> None:
        self.draws.epoch_begins(epoch)

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

    def _augmented_features(self, inputs, replay: bool):
        """train_mode, no_batchnorm and no_dropout features of a batch of augmented inputs. Replaying
        images, every pass runs the whole base as ``fit`` ran it: the frozen bottom computed in a graph of
        its own rounds differently (measured: 3e-7 in a loss), and ``gap/lag`` would not be exactly 0."""
        if self.stage == "pooled":  # a frozen, deterministic base: one feature set
            f = as_list(inputs)[0]
            return f, f, f
        if self.stage == "bottom":
            return self._tops(as_list(inputs))
        if self._split and not replay:
            return self._tops(self._split.bottom(inputs))
        return self._whole_base(inputs)

    def _clean(self, inputs, index: int | None) -> tf.Tensor:
        """Inference-mode features of a clean batch; ``index``: its place in the split's own order, when
        the split is read in it (then a frozen part's output is computed once per phase)."""
        if self.stage == "pooled":
            return as_list(inputs)[0]
        if self.stage == "bottom":
            return self._split.top_infer(*as_list(inputs))
        if index is None:  # in training order: the whole base, as for the augmented conditions
            return self.passes.features_infer(inputs)
        if self._fixed_clean:
            if index < len(self._clean_features):
                return self._clean_features[index]
            f_clean = self.passes.features_infer(inputs)
            self._kept.append(f_clean)
            return f_clean
        if self._split is None:
            return self.passes.features_infer(inputs)
        if index < len(self._clean_bottom):
            crossing = self._clean_bottom[index]
        else:
            crossing = self._split.bottom(inputs)
            self._kept.append(crossing)
            self._kept_bytes += sum(int(t.shape.num_elements()) * t.dtype.size for t in crossing)
            if self._kept_bytes > self.clean_bottom_budget:  # too large to keep: recompute every epoch
                self._kept.clear()
        return self._split.top_infer(*crossing)

    def _replayed_batches(self, k: int):
        """(labels, augmented inputs, clean inputs) of the phase's ``k``-th epoch, in training order."""
        order = self.order.epoch(k)
        if self.epoch_batches is not None:
            kept = self.epoch_batches.batches
            for (inputs, y), (clean, y_clean) in zip(kept, order, strict=True):
                if not bool(tf.reduce_all(tf.equal(y, y_clean))):
                    raise RuntimeError("the kept augmented batches are not in the order the meter replays")
                yield y, inputs, clean
            return
        for x, y in order:
            yield y, (self.passes.augment(x) if self.augments else x), x

    def _batches_in_order(self):
        """(labels, augmented inputs, clean inputs) over the split in its own order, the meter's own draws
        (kept augmented batches, if any, in training order are paired with the clean split in order)."""
        if self.epoch_batches is not None:
            for (inputs, y), (clean, _) in zip(self.epoch_batches.batches, self.dataset, strict=True):
                yield y, inputs, clean
            return
        for x, y in self.dataset:
            yield y, (self.passes.augment(x) if self.augments else x), x

    def _conditions(self, epoch: int, corners: bool = False):
        """Per batch: labels, the pooled features under train_mode, no_batchnorm, no_dropout and clean, and
        with ``corners`` the clean images' features with BatchNorm on batch and on moving statistics."""
        index = self.draws.set_for(epoch)
        replay = self.replayed = index is not None
        batches = self._replayed_batches(index) if replay else self._batches_in_order()
        in_order = not replay and self.epoch_batches is None
        self._kept: list = []
        self._kept_bytes = 0
        for index, (y, augmented, clean) in enumerate(batches):
            f_train, f_no_bn, f_no_drop = self._augmented_features(augmented, replay)
            f_clean = f_no_drop if clean is augmented else self._clean(clean, index if in_order else None)
            clean_bn = None
            if corners:
                clean_bn = (f_train, f_no_bn) if clean is augmented else self._augmented_features(clean, replay)[:2]
            yield y, f_train, f_no_bn, f_no_drop, f_clean, clean_bn
        if in_order and self._kept and self._kept_bytes <= self.clean_bottom_budget:  # kept once complete
            (self._clean_features if self._fixed_clean else self._clean_bottom).extend(self._kept)

    def measure(self, epoch: int, scorer: Scorer, corners: bool = False) -> dict[str, float]:
        """Accuracy, loss and correct count under each condition (as ``scorer`` defines them: the compiled
        metric and loss, averaged as Keras averages them), with everything a pass can write restored.

        With ``corners`` also every combination of the three effects removed (``decomposition.EFFECTS``:
        the 2x2x2 corners, under ``corner_accuracy``/``corner_loss`` keyed by the set removed), all with
        the same batches, draws and dropout masks, for the attribution that no removal order decides."""
        if corners and self.base_is_stochastic:
            raise ValueError("the 2x2x2 corners need a body without random layers (EfficientNet's stochastic depth)")
        saved = copy_values(self._written)
        tallies = {name: Tally() for name in CONDITIONS}
        extra = {removed: Tally() for removed in EXTRA_CORNERS} if corners else {}
        try:
            for y, f_train, f_no_bn, f_no_drop, f_clean, clean_bn in self._conditions(epoch, corners):
                # the same dropout mask for every dropout-on pass, so only BatchNorm (or augmentation) differs
                mask = copy_values(self._dropout_seeds)
                tallies["train_mode"].add(scorer, self.passes.head_dropout(f_train), y)
                for removed, features in ((BN_AUG, clean_bn and clean_bn[1]), (AUG, clean_bn and clean_bn[0])):
                    if removed in extra:
                        assign_values(self._dropout_seeds, mask)
                        extra[removed].add(scorer, self.passes.head_dropout(features), y)
                assign_values(self._dropout_seeds, mask)
                tallies["no_batchnorm"].add(scorer, self.passes.head_dropout(f_no_bn), y)
                tallies["no_dropout"].add(scorer, self.passes.head_infer(f_no_drop), y)
                tallies["train_clean"].add(scorer, self.passes.head_infer(f_clean), y)
                if extra:
                    extra[DROP].add(scorer, self.passes.head_infer(f_train), y)
                    extra[DROP_AUG].add(scorer, self.passes.head_infer(clean_bn[0]), y)
        finally:
            assign_values(self._written, saved)
        out: dict = condition_results(tallies)
        if corners:
            chain = dict(zip(CHAIN_CORNERS, CONDITIONS, strict=True))
            for metric in ("accuracy", "loss"):
                values = {removed: out[f"{name}_{metric}"] for removed, name in chain.items()}
                values |= {removed: getattr(tally, metric) for removed, tally in extra.items()}
                out[f"corner_{metric}"] = values
        return out

"""The gap's components from the measured conditions, and the intervals that say how much they can be
trusted. No TensorFlow here: the report and the tests read these definitions cheaply.

    accuracy                Keras's number: averaged over the epoch while the weights moved
    train_mode_accuracy     full training-mode pass (augmentation, BN batch statistics, dropout)
    no_batchnorm_accuracy   ... with BatchNorm on its moving statistics
    no_dropout_accuracy     ... and every dropout layer off
    train_clean_accuracy    ... and no augmentation: the training split as validation sees data
    val_accuracy            Keras's validation number

Consecutive differences are the gap components; they sum exactly to ``val - train``. The same is done
for the loss. See docs/gap-measurement.md."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from .. import record as rec
from ..chance import accuracy_interval, at_chance, correct_count, wilson_interval

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


# The three training-time effects between the training-mode pass and the clean one, in the order the chain
# of CONDITIONS removes them: an interaction of two effects lands in the component of the one removed first
# (the other is then removed from a model without it).
EFFECTS = ("batchnorm", "dropout", "augmentation")
ATTRIBUTIONS = ("ordered", "shapley")


def ordered_components(corners: Mapping[frozenset, float], order: tuple[str, ...] = EFFECTS) -> dict[str, float]:
    """Each effect's component when the effects are removed in ``order``: the change its removal makes,
    given the ones removed before it. ``corners`` maps each set of removed effects to the measured number."""
    removed: frozenset = frozenset()
    out = {}
    for effect in order:
        after = removed | {effect}
        out[effect] = corners[after] - corners[removed]
        removed = after
    return out


def shapley_components(corners: Mapping[frozenset, float]) -> dict[str, float]:
    """The attribution no removal order decides: each effect's component averaged over all six orders (the
    Shapley value of the 2x2x2 corners). Like every order's, the three add up to the clean pass minus the
    training-mode pass, so the decomposition still sums to the gap."""
    orders = list(itertools.permutations(EFFECTS))
    by_order = [ordered_components(corners, order) for order in orders]
    return {effect: sum(c[effect] for c in by_order) / len(orders) for effect in EFFECTS}


def majority_rate(labels: list) -> float:
    """Share of the most common class: the accuracy of always guessing it."""
    return max(labels.count(name) for name in set(labels)) / len(labels)


def chance_warning(val_accuracy: float, val_count: int, majority: float) -> str | None:
    """A warning when the validation accuracy's 95% Wilson interval reaches down to the majority-class
    rate: such a model is not distinguishably better than guessing the larger class (or is worse), so its
    gap components are noise. The rule is the project's one (chance.py), which the study report applies too."""
    if not at_chance(val_accuracy, val_count, majority):
        return None
    low, high = accuracy_interval(val_accuracy, val_count)
    return (
        f"AT CHANCE: val_accuracy {val_accuracy:.3f} (95% interval {low:.3f}-{high:.3f}, {val_count} images) "
        f"is not distinguishably above the majority-class rate {majority:.3f}. The model explains nothing "
        "yet, and its gap components are noise."
    )


def decompose(
    keras_logs: dict[str, float],
    measured: dict,
    val_count: int | None,
    accuracy: str = rec.ACCURACY,
    attribution: str = "ordered",
) -> dict[str, float]:
    """Gap components for accuracy (``gap/*``) and loss (``gap_loss/*``), plus Wilson intervals.
    ``accuracy`` is the name Keras logs the accuracy under (``val_`` + it for validation); the
    validation interval needs ``val_count``, the number of validation examples. ``attribution="shapley"``
    (with the 2x2x2 corners measured) gives batchnorm, dropout and augmentation their Shapley values
    instead of the chain's differences; lag, split and the total are the same either way."""
    out: dict[str, float] = {}
    for name in CONDITIONS:
        out[f"{name}_accuracy"] = measured[f"{name}_accuracy"]
        out[f"{name}_loss"] = measured[f"{name}_loss"]
    for metric, keras_name, prefix in (
        ("accuracy", accuracy, rec.GAP_PREFIX),
        ("loss", rec.LOSS, rec.GAP_LOSS_PREFIX),
    ):
        values = {name: measured[f"{name}_{metric}"] for name in CONDITIONS}
        values["keras_train"] = float(keras_logs[keras_name])
        values["keras_val"] = float(keras_logs[f"val_{keras_name}"])
        out[f"{prefix}total"] = values["keras_val"] - values["keras_train"]
        for component, (plus, minus) in COMPONENTS.items():
            out[f"{prefix}{component}"] = values[plus] - values[minus]
        if attribution == "shapley":
            for effect, value in shapley_components(measured[f"corner_{metric}"]).items():
                out[f"{prefix}{effect}"] = value
    intervals: list[tuple[str, int, int]] = [
        (rec.TRAIN_CLEAN_ACCURACY, int(measured["train_clean_correct"]), int(measured["train_count"]))
    ]
    if val_count:
        val_correct = correct_count(float(keras_logs[f"val_{accuracy}"]), val_count)
        intervals.insert(0, (rec.VAL_ACCURACY, val_correct, val_count))
    for name, correct, count in intervals:
        out.update(zip(rec.interval_metrics(name), wilson_interval(correct, count), strict=True))
    return out

"""The one at-chance rule of the project, for a run's end and for ``ablate-report`` alike.

A model whose validation accuracy is not distinguishably above the majority-class rate of its validation
split (always answering the larger class does as well) has learnt nothing, and splitting its gap into
causes apportions noise. "Not distinguishably above": the 95% Wilson score interval of the accuracy, on
the split's images, reaches down to the majority-class rate, or lies below it (docs/report.md,
"Runs at chance"). Plain numbers in, no TensorFlow and no MLflow: both sides import it cheaply."""

from __future__ import annotations

import functools
import math

from scipy.stats import binomtest

CONFIDENCE = 0.95


@functools.lru_cache(maxsize=4096)  # a study asks about the same few counts again and again
def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``successes`` of ``trials``), via scipy."""
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def correct_count(val_accuracy: float, count: float) -> int:
    """The number of correctly classified images behind a logged accuracy (a fraction of ``count``)."""
    return round(val_accuracy * round(count))


def accuracy_interval(val_accuracy: float, count: float) -> tuple[float, float]:
    """The 95% Wilson interval of an accuracy measured on ``count`` images (as runs log it)."""
    return wilson_interval(correct_count(val_accuracy, count), round(count))


def at_chance(val_accuracy: float, count: float, majority: float) -> bool | None:
    """True when ``val_accuracy`` on ``count`` images is not distinguishably above ``majority`` (the
    majority-class rate of those images): its Wilson interval reaches down to the rate, or lies below it.
    None when it cannot be known (a missing number, no images)."""
    numbers = (val_accuracy, count, majority)
    if any(v is None or math.isnan(v) for v in numbers) or round(count) < 1:
        return None
    low, _ = accuracy_interval(val_accuracy, count)
    return low <= majority

"""The report's basic statistics and its reading of the runs, as small pure functions on pandas objects,
so tests can redo them by hand: the t-interval, p-value, Holm's adjustment and verdict of one mean; which
runs count; which params are factors. The means themselves are taken over independent replicate blocks
(``blocked``): a study has 2-10 blocks, where the normal 1.96 would claim far too much (t is 12.7 for two
blocks, 4.3 for three). The five gap components of a study are five tests at once: their verdicts are
Holm-adjusted, so "real" keeps its 5% error rate for the study as a whole, not per component."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .. import record as rec
from ..config import COMPUTING, replicate_keys, role_of

CONFIDENCE = 0.95
NOT_LOGGED = "(not logged)"
MAX_LEVELS = 8  # a numeric factor with more distinct values (an Optuna search) is binned
BINS = 4

# Seeds are the replicates the levels are averaged over, not factors: ``seed`` (initialisation, dropout,
# augmentation) and ``data.seed`` (the train/validation split and the shuffle order); the schema marks them.
REPLICATE_KEYS = replicate_keys()


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.ci_low > 0 or self.ci_high < 0)


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample sd (ddof=1) and the t-interval of the mean; missing values are left out."""
    x = np.asarray(values if isinstance(values, pd.Series | np.ndarray) else list(values), dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    if sd == 0:
        return Summary(n, mean, 0.0, mean, mean)
    half = float(stats.t.ppf((1 + confidence) / 2, df=n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def p_value(s: Summary) -> float:
    """Two-sided one-sample t-test of mean 0; NaN where there is no spread to test with."""
    if s.n < 2 or not s.sd > 0:
        return math.nan
    t = s.mean / (s.sd / math.sqrt(s.n))
    return float(2 * stats.t.sf(abs(t), df=s.n - 1))


def holm(p_values: Iterable[float]) -> list[float]:
    """Holm's step-down adjustment (NaN stays NaN and is not counted as a test)."""
    p = list(p_values)
    tested = sorted((v, i) for i, v in enumerate(p) if not math.isnan(v))
    m, running, out = len(tested), 0.0, [math.nan] * len(p)
    for rank, (v, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * v))
        out[i] = running
    return out


ABSENT = "absent: exactly 0 in every block"
ONE_BLOCK = "one block only: no interval, repeat over more seeds"
REAL = "real"


def verdict(s: Summary, p_adjusted: float | None = None, tests: int = 1) -> str:
    """Plain words for one mean over blocks: is it there, beyond block-to-block noise? ``p_adjusted`` is
    its Holm-adjusted p over ``tests`` means tested together (None: tested alone)."""
    if s.n == 0:
        return "not measured (diagnostics=off)"
    if s.n == 1:
        return ONE_BLOCK
    if s.sd == 0:
        if s.mean == 0:
            return ABSENT
        return f"no variation: the same value in all {s.n} blocks, so no interval"
    if not s.excludes_zero():
        return "not distinguishable from zero"
    if p_adjusted is not None and not p_adjusted < 1 - CONFIDENCE:
        return f"interval excludes zero, but not after Holm's correction for {tests} tests"
    return REAL


def _tag(runs: pd.DataFrame, name: str) -> pd.Series:
    column = f"tags.{name}"
    return runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=object)


def classify(runs: pd.DataFrame) -> pd.Series:
    """What each run is to the report: finished (used), failed, pruned, running, or not a job at all
    (a sweep's parent run, a reproduction of another run). Later rules win."""
    kind = pd.Series("failed", index=runs.index, dtype=object)  # FAILED and KILLED
    kind[runs["status"].isin(["RUNNING", "SCHEDULED"])] = "running"
    kind[runs["status"] == "FINISHED"] = "finished"
    kind[_tag(runs, rec.PRUNED_TAG) == rec.TRUE] = "pruned"
    kind[_tag(runs, rec.REPRODUCED_TAG).notna()] = "reproduction"
    kind[_tag(runs, rec.ROLE_TAG) == rec.PARENT_ROLE] = "parent"
    return kind


def is_config_param(key: str) -> bool:
    """A param that decides what a run computes (config.COMPUTING, seeds included): not where or how it
    was recorded, not a value the training derived from other settings."""
    derived = key in rec.DERIVED_PARAMS or key.startswith(rec.DATA_COUNT_PARAM_PREFIX)
    return not derived and role_of(key) in COMPUTING


def is_factor_key(key: str) -> bool:
    return is_config_param(key) and key not in REPLICATE_KEYS


def param_values(runs: pd.DataFrame, key: str) -> pd.Series:
    """A param per run as logged (a string), ``(not logged)`` where a run lacks it."""
    column = f"params.{key}"
    if column not in runs:
        return pd.Series(NOT_LOGGED, index=runs.index, dtype=object)
    return runs[column].fillna(NOT_LOGGED).astype(str)


def varying_params(runs: pd.DataFrame, keys: Iterable[str] | None = None) -> list[str]:
    """Params (all, or ``keys``) that take more than one value across ``runs``."""
    if keys is None:
        keys = sorted(c[len("params.") :] for c in runs.columns if c.startswith("params."))
    return [k for k in keys if param_values(runs, k).nunique() > 1]


def override_choices(runs: pd.DataFrame, groups: Iterable[str]) -> pd.DataFrame:
    """Config-group choices (``augment=strong``) from each run's ``hydra.overrides`` tag, one column per
    group; ``(default)`` where a run did not choose. The tag is Hydra's space-joined task overrides."""
    groups = set(groups)
    rows = []
    for text in _tag(runs, rec.HYDRA_OVERRIDES_TAG).fillna(""):
        rows.append({k: v for k, v in rec.override_values(text).items() if k in groups})
    frame = pd.DataFrame(rows, index=runs.index, columns=sorted(groups))
    return frame.fillna("(default)").astype(str)


@dataclass(frozen=True)
class Factor:
    name: str  # a param key (model.dropout) or a config group (augment)
    levels: pd.Series  # level label per run, same index as the runs
    order: tuple[str, ...]  # levels, in the order tables and plots show them
    covers: tuple[str, ...] = ()  # params that change with a config-group choice
    note: str = ""


def level_order(labels: pd.Series) -> tuple[str, ...]:
    """Numeric levels in numeric order, others alphabetically; ``(not logged)`` last."""
    present = [v for v in pd.unique(labels) if v != NOT_LOGGED]
    try:
        ordered = sorted(present, key=float)
    except (TypeError, ValueError):
        ordered = sorted(present, key=str)
    return tuple(ordered) + ((NOT_LOGGED,) if (labels == NOT_LOGGED).any() else ())


def bin_numeric(values: pd.Series, bins: int = BINS) -> tuple[pd.Series, tuple[str, ...]] | None:
    """Quantile bins for a numeric factor with many levels; None when the values are not numbers."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        return None
    cut = pd.qcut(numbers, q=bins, duplicates="drop")
    labels = cut.astype(str)
    order = tuple(str(c) for c in cut.cat.categories if (labels == str(c)).any())
    return labels, order


def _determined_by(key_values: pd.Series, group: pd.Series) -> bool:
    """True when the param takes one value within every level of the group choice."""
    return bool((key_values.groupby(group).nunique() <= 1).all())


def find_factors(finished: pd.DataFrame, groups: Iterable[str] = ()) -> list[Factor]:
    """Swept keys of a study: varying config-group choices, then varying params not explained by them."""
    factors: list[Factor] = []
    choices = override_choices(finished, groups)
    varying = [k for k in varying_params(finished) if is_factor_key(k)]
    explained: set[str] = set()
    for group in choices.columns:
        level = choices[group]
        if level.nunique() <= 1:
            continue
        covers = tuple(
            k for k in varying if k.startswith(f"{group}.") and _determined_by(param_values(finished, k), level)
        )
        explained.update(covers)
        factors.append(Factor(group, level, level_order(level), covers))
    for key in varying:
        if key in explained:
            continue
        values = param_values(finished, key)
        binned = bin_numeric(values) if values.nunique() > MAX_LEVELS else None
        if binned is None:
            factors.append(Factor(key, values, level_order(values)))
        else:
            labels, order = binned
            factors.append(Factor(key, labels, order, note=f"{values.nunique()} values, in {len(order)} bins"))
    return sorted(factors, key=_factor_rank)


# The factors first, in the order a reader thinks about them; other swept keys after.
_PREFERRED = (
    "model.fine_tune_at",
    "model.bn_training",
    "model.freeze_bn",
    "model.dropout",
    "augment",
    "train.fine_tune_lr",
)


def _factor_rank(factor: Factor) -> tuple[int, str]:
    for i, name in enumerate(_PREFERRED):
        if factor.name == name or factor.name.startswith(f"{name}."):
            return i, factor.name
    return len(_PREFERRED), factor.name


def final_metrics(runs: pd.DataFrame, metrics: Iterable[str]) -> pd.DataFrame:
    """Final-epoch value of each metric per run (MLflow's latest value); NaN where not logged."""
    columns = {
        m: pd.to_numeric(runs[f"metrics.{m}"], errors="coerce")
        if f"metrics.{m}" in runs
        else pd.Series(math.nan, index=runs.index)
        for m in metrics
    }
    return pd.DataFrame(columns, index=runs.index)


def best_and_worst(finished: pd.DataFrame) -> tuple[str, str] | None:
    """Run ids with the highest and lowest final val_accuracy (ties: lower val_loss is better)."""
    scores = final_metrics(finished, [rec.VAL_ACCURACY, rec.VAL_LOSS]).dropna(subset=[rec.VAL_ACCURACY])
    if scores.empty:
        return None
    ranked = scores.sort_values([rec.VAL_ACCURACY, rec.VAL_LOSS], ascending=[False, True], kind="stable")
    return str(finished.loc[ranked.index[0], "run_id"]), str(finished.loc[ranked.index[-1], "run_id"])

"""What counts as one piece of evidence in a study, and which noise the report's intervals cover.

Three rules, each a pure function on the runs as ``mlflow.search_runs`` returns them:

- **Distinct runs.** Runs with the same config and seeds (a ``resume=false`` rerun, a copy) are one
  replicate, and runs with the same ``model.weights_sha256`` are bit-identical models. Both are merged
  into one *unit* (its value: the mean of its runs); every interval is over units, never over copies.
- **Replicate design.** ``seed`` and ``data.seed`` are replicates, not factors; the report states which
  of them varies, so a reader knows whether an interval covers the choice of validation images.
- **Chance level.** A run whose validation accuracy is not distinguishably above the majority-class rate
  of its validation split (the 95% Wilson interval of its accuracy reaches down to that rate, or lies
  below it) has learnt nothing: its gap components are noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

from ..record import VAL_COUNT_PARAM_PREFIX, WEIGHTS_DIGEST_TAG
from .stats import CONFIDENCE, REPLICATE_KEYS, Factor, is_config_param, param_values, summarize

# What each replicate seed changes (run/data.py, run/train.py): the reader's "which noise does an interval cover".
SEED_MEANING = {
    "seed": "weight initialisation, dropout masks and augmentation",
    "data.seed": "which images are in the validation split, and the shuffle order",
}


def config_keys(runs: pd.DataFrame) -> list[str]:
    """Params that decide what a run computes (seeds included): not where it is recorded, not display
    settings, not values derived from others."""
    keys = (c[len("params.") :] for c in runs.columns if c.startswith("params."))
    return sorted(k for k in keys if is_config_param(k))


def _signature(runs: pd.DataFrame, keys: list[str]) -> pd.Series:
    if not keys:
        return pd.Series("", index=runs.index, dtype=object)
    columns = [param_values(runs, k) for k in keys]
    return pd.Series(["\x1f".join(parts) for parts in zip(*columns, strict=True)], index=runs.index)


def weights_hashes(runs: pd.DataFrame) -> pd.Series:
    column = f"tags.{WEIGHTS_DIGEST_TAG}"
    return runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=object)


def unit_ids(runs: pd.DataFrame) -> pd.Series:
    """One id per distinct run: runs sharing config + seeds, or sharing a weights hash, get the same id
    (transitively), so a rerun and a bit-identical level each count once."""
    parent = {i: i for i in runs.index}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in (_signature(runs, config_keys(runs)), weights_hashes(runs)):
        for _, members in key.dropna().groupby(key.dropna()).groups.items():
            first, *rest = list(members)
            for other in rest:
                parent[root(other)] = root(first)
    roots = pd.Series([root(i) for i in runs.index], index=runs.index)
    return roots.map({r: n for n, r in enumerate(pd.unique(roots))})


def per_unit(values: pd.DataFrame, units: pd.Series) -> pd.DataFrame:
    """Each unit's values: the mean over its runs (copies are equal; reruns after a change are averaged)."""
    return values.groupby(units.loc[values.index]).mean()


@dataclass(frozen=True)
class Merges:
    runs: int
    units: int
    reruns: int  # runs that repeat another run's config and seeds
    identical: int  # further runs bit-identical to a run with another config


def merges(runs: pd.DataFrame, units: pd.Series) -> Merges:
    same_config = int(_signature(runs, config_keys(runs)).duplicated().sum())
    return Merges(len(runs), int(units.nunique()), same_config, len(runs) - int(units.nunique()) - same_config)


@dataclass(frozen=True)
class Identity:
    """How often a factor's levels gave bit-identical models in otherwise equal runs."""

    identical: int
    compared: int

    @property
    def changes_nothing(self) -> bool:
        return self.compared > 0 and self.identical == self.compared


def factor_identity(runs: pd.DataFrame, factor: Factor) -> Identity:
    """Compare the levels of ``factor`` between runs equal in everything else (config and seeds)."""
    own = {factor.name, *factor.covers}
    others = [k for k in config_keys(runs) if k not in own and not k.startswith(f"{factor.name}.")]
    hashes = weights_hashes(runs)
    identical = compared = 0
    for _, index in _signature(runs, others).groupby(_signature(runs, others)).groups.items():
        if factor.levels.loc[index].nunique() < 2:
            continue
        compared += 1
        found = hashes.loc[index]
        identical += int(found.notna().all() and found.nunique() == 1)
    return Identity(identical, compared)


# ---------------------------------------------------------------------------------------------------
# Replicate design


@dataclass(frozen=True)
class Design:
    varying: dict[str, int]  # replicate key -> distinct values, for those that vary
    fixed: dict[str, str]  # replicate key -> its one value


def replicate_design(runs: pd.DataFrame) -> Design:
    varying, fixed = {}, {}
    for key in REPLICATE_KEYS:
        values = param_values(runs, key)
        if values.nunique() > 1:
            varying[key] = int(values.nunique())
        else:
            fixed[key] = str(values.iloc[0]) if len(values) else "?"
    return Design(varying, fixed)


def covers_sentence(design: Design) -> str:
    """Which noise the intervals cover, in one sentence the report prints first."""
    if not design.varying:
        return (
            "Nothing varies between replicates (one value of `seed` and of `data.seed`): the intervals "
            "below cover no noise at all, only the spread across the other factors' levels."
        )
    covered = "; ".join(f"`{k}` ({n} values: {SEED_MEANING[k]})" for k, n in design.varying.items())
    sentence = f"Between replicates vary {covered}."
    if "data.seed" in design.fixed:
        sentence += (
            f" `data.seed` is {design.fixed['data.seed']} in every run: the split is fixed, so an interval "
            "covers the noise of one train/validation split, and a `split` verdict is about these validation "
            "images, not unseen ones. A study that asks about the split varies `data.seed` with the seed."
        )
    else:
        sentence += " The validation images change between replicates: intervals cover the choice of split."
    return sentence


# ---------------------------------------------------------------------------------------------------
# Chance level


def majority_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: validation images (``val_count``) and the majority-class rate of that split
    (``majority``), from the class counts every run logs as params ``data.count.val.<class>``."""
    columns = [c for c in runs.columns if c.startswith(f"params.{VAL_COUNT_PARAM_PREFIX}") and not c.endswith(".total")]
    counts = runs[columns].apply(pd.to_numeric, errors="coerce") if columns else pd.DataFrame(index=runs.index)
    total = counts.sum(axis=1, min_count=1)
    return pd.DataFrame({"val_count": total, "majority": counts.max(axis=1) / total}, index=runs.index)


def wilson(accuracy: float, count: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on ``count`` images (as the runs log it)."""
    trials = round(count)
    ci = stats.binomtest(round(accuracy * trials), trials).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def run_at_chance(accuracy: float, majority: float, count: float) -> bool | None:
    """The run's validation accuracy is not distinguishably above the majority rate: its Wilson interval
    contains the rate, or lies below it (always answering the larger class does as well). None: not known."""
    if any(map(math.isnan, (accuracy, majority, count))) or count < 1:
        return None
    low, _ = wilson(accuracy, count)
    return low <= majority


def at_chance(accuracy: pd.Series, majority: pd.Series, count: pd.Series) -> bool | None:
    """A group of distinct runs is at chance when either noise leaves its mean accuracy not above the
    majority rate: the Wilson interval on one split's images reaches down to the mean majority rate, or
    the t-interval over the runs of (accuracy - majority) reaches down to zero."""
    frame = pd.DataFrame({"acc": accuracy, "maj": majority, "n": count}).dropna()
    if frame.empty:
        return None
    if run_at_chance(frame["acc"].mean(), frame["maj"].mean(), frame["n"].mean()):
        return True
    spread = summarize(frame["acc"] - frame["maj"])
    return bool(spread.n >= 2 and spread.sd > 0 and spread.ci_low <= 0)

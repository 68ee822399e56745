"""What counts as one piece of evidence in a study, and which noise the report's intervals cover.

Four rules, each a pure function on the runs as ``mlflow.search_runs`` returns them:

- **Distinct runs.** Runs with the same config and seeds (a ``resume=false`` rerun, a copy) are one
  replicate, and runs with the same ``model.weights_sha256`` are bit-identical models. Both are merged
  into one *unit* (its value: the mean of its runs), never counted twice.
- **Independent blocks.** Runs that share a value of a replicate key that varies (``seed``,
  ``data.seed``) share its noise: the head's initialisation, the dropout and augmentation draws, the
  validation images. Such runs form one *block*; blocks share nothing random, so they are the unit of
  independence. Every interval is over blocks (``blocked``), never over runs.
- **Replicate design.** ``seed`` and ``data.seed`` are replicates, not factors; the report states which
  of them varies, so a reader knows whether an interval covers the choice of validation images.
- **Chance level** (``finetune_ablation.chance``). A run whose validation accuracy is not distinguishably
  above the majority-class rate of its validation split has learnt nothing: its gap components are noise.
  A level or a study is at chance when its accuracy is not above that rate over its blocks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from .. import chance
from ..record import VAL_ACCURACY, VAL_COUNT_PARAM_PREFIX, WEIGHTS_DIGEST_TAG
from . import blocked
from .stats import REPLICATE_KEYS, Factor, is_config_param, param_values, summarize

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


def _connected(index: pd.Index, links: Iterable[pd.Series]) -> pd.Series:
    """Group ids (0, 1, ... in order of first appearance): two runs are in one group when any of the
    ``links`` gives them the same (non-missing) value, directly or through other runs (union-find)."""
    parent = {i: i for i in index}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in links:
        present = key.dropna()
        for _, members in present.groupby(present).groups.items():
            first, *rest = list(members)
            for other in rest:
                parent[root(other)] = root(first)
    roots = pd.Series([root(i) for i in index], index=index)
    return roots.map({r: n for n, r in enumerate(pd.unique(roots))})


def weights_hashes(runs: pd.DataFrame) -> pd.Series:
    column = f"tags.{WEIGHTS_DIGEST_TAG}"
    return runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=object)


def unit_ids(runs: pd.DataFrame) -> pd.Series:
    """One id per distinct run: runs sharing config + seeds, or sharing a weights hash, get the same id
    (transitively), so a rerun and a bit-identical level each count once."""
    return _connected(runs.index, (_signature(runs, config_keys(runs)), weights_hashes(runs)))


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
    signature = _signature(runs, others)
    for _, index in signature.groupby(signature).groups.items():
        if factor.levels.loc[index].nunique() < 2:
            continue
        compared += 1
        found = hashes.loc[index]
        identical += int(found.notna().all() and found.nunique() == 1)
    return Identity(identical, compared)


# ---------------------------------------------------------------------------------------------------
# Independent blocks and the replicate design


@dataclass(frozen=True)
class Blocks:
    """The study's independent replicate blocks."""

    ids: pd.Series  # block id per run (0, 1, ...)
    keys: tuple[str, ...]  # the replicate keys that vary
    combinations: int  # distinct combinations of their values
    labels: dict[int, str]  # block id -> its replicate values, e.g. "seed=1, data.seed=1"
    missing: dict[int, int]  # block id -> configs of the study it has no finished run of, where any

    @property
    def count(self) -> int:
        return int(self.ids.nunique())

    @property
    def merged(self) -> bool:
        """Combinations of the keys share values (e.g. ``seed`` crossed with ``data.seed``), so several of
        them form one block."""
        return self.count < self.combinations


def cells(runs: pd.DataFrame) -> pd.Series:
    """Each run's config apart from the seeds, as a number (in the sort order of the configs): the runs of
    one cell differ only in noise."""
    signature = _signature(runs, [k for k in config_keys(runs) if k not in REPLICATE_KEYS])
    return pd.Series(pd.factorize(signature, sort=True)[0], index=runs.index)


def block_ids(runs: pd.DataFrame, units: pd.Series) -> Blocks:
    """Runs sharing the value of any replicate key that varies share its noise: they are one block
    (transitively; a distinct run is never split). With no varying key the study is one block."""
    keys = tuple(k for k in REPLICATE_KEYS if param_values(runs, k).nunique() > 1)
    values = {k: param_values(runs, k) for k in keys}
    if keys:
        ids = _connected(runs.index, [*values.values(), units])
        combinations = int(_signature(runs, list(keys)).nunique())
    else:
        ids = pd.Series(0, index=runs.index)
        combinations = 1
    labels = {}  # numbered in the natural order of their values, not in the order MLflow listed the runs
    order = {b: n for n, b in enumerate(sorted(pd.unique(ids), key=lambda b: _first_values(values, ids == b)))}
    ids = ids.map(order)
    for block, index in ids.groupby(ids).groups.items():
        parts = [f"{k}={','.join(sorted(pd.unique(v.loc[index]), key=_natural))}" for k, v in values.items()]
        labels[int(block)] = ", ".join(parts) or "all runs"
    config = cells(runs).groupby(units).transform("min")  # bit-identical configs count as one (blocked.block_table)
    wanted = config.nunique()
    missing = {int(b): int(wanted - config.loc[i].nunique()) for b, i in ids.groupby(ids).groups.items()}
    return Blocks(ids, keys, combinations, labels, {b: m for b, m in missing.items() if m})


def _first_values(values: dict[str, pd.Series], mask: pd.Series) -> tuple:
    return tuple(min((_natural(v) for v in column[mask]), default=(2, 0.0, "")) for column in values.values())


def _natural(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def study_layout(runs: pd.DataFrame) -> tuple[blocked.Layout, Blocks]:
    """Where each run sits: its distinct run, its independent block, its cell."""
    units = unit_ids(runs)
    blocks = block_ids(runs, units)
    return blocked.Layout(units, blocks.ids, cells(runs)), blocks


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


ABOVE_MAJORITY = "above_majority"  # val_accuracy - majority rate, per run


def with_majority(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The final metrics with ``majority``, ``val_count`` and ``above_majority`` per run."""
    rates = majority_rates(runs)
    frame = pd.concat([metrics, rates], axis=1)
    frame[ABOVE_MAJORITY] = frame[VAL_ACCURACY] - frame["majority"]
    return frame


def at_chance(means: pd.DataFrame) -> bool | None:
    """A group of runs (a level, the study) is at chance when either noise leaves its accuracy not above
    the majority rate: the Wilson interval on one split's images reaches down to the mean majority rate
    (``chance.at_chance`` on the means over blocks), or the t-interval over blocks of (accuracy -
    majority) reaches down to zero. ``means``: the group's block means (``blocked.block_table``)."""
    frame = means[[VAL_ACCURACY, "majority", "val_count", ABOVE_MAJORITY]].dropna()
    if frame.empty:
        return None
    if chance.at_chance(frame[VAL_ACCURACY].mean(), frame["val_count"].mean(), frame["majority"].mean()):
        return True
    above = summarize(frame[ABOVE_MAJORITY])
    return bool(above.n >= 2 and above.sd > 0 and above.ci_low <= 0)

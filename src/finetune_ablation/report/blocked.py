"""Statistics over independent replicate blocks: the report's means, effects and intervals.

The runs of one block share its seeds' noise (``design.block_ids``), so a block is one piece of evidence
however many runs it holds; every interval here has n = blocks and blocks - 1 degrees of freedom
(docs/report.md, "What an interval covers").

- **A mean over the study** (a gap component, the total, a level's accuracy): average within each block
  first, over its *cells* (the configs apart from the seeds; copies merged into distinct runs before),
  then the Student-t interval over the block means.
- **A factor's effect** is a randomized complete block design: each level's block mean is contrasted
  with the reference level's *within the same block* (paired over blocks), so the noise a block shares
  cancels; all levels are tested together by the F test of the block means on level + block (an ANOVA
  with a block term, statsmodels).
- **Unbalanced studies** (a job failed in one block): a block that lacks a cell gets it from the additive
  model cell + block fitted by least squares (statsmodels), so every block averages over the same
  configs and a missing config does not pass for block-to-block noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import linalg, stats

from .stats import CONFIDENCE, Factor, Summary, holm, p_value, summarize, verdict

FACTOR_COLUMNS = ["factor", "level", "metric", "runs", "distinct_runs", "blocks", "mean", "sd", "ci_low", "ci_high"]
EFFECT_COLUMNS = ["factor", "metric", "level", "reference", "blocks", "mean", "sd", "ci_low", "ci_high", "p", "anova_p"]


@dataclass(frozen=True)
class Layout:
    """Where each run sits in its study (one entry per run, the runs' index)."""

    units: pd.Series  # distinct-run id: copies and bit-identical models merged (design.unit_ids)
    blocks: pd.Series  # independent block id (design.block_ids)
    cells: pd.Series  # the config apart from the seeds (any sortable label: design.cells numbers them)


def _group_means(codes: np.ndarray, groups: int, data: np.ndarray) -> np.ndarray:
    """Per group (``codes`` 0..groups-1, one per row of ``data``), the mean of each column over its rows
    that have a value; NaN where a group has none."""
    present = ~np.isnan(data)
    sums = np.zeros((groups, data.shape[1]))
    counts = np.zeros((groups, data.shape[1]))
    np.add.at(sums, codes, np.where(present, data, 0.0))
    np.add.at(counts, codes, present)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _dummies(frame: pd.DataFrame) -> pd.DataFrame:
    """Intercept + treatment-coded indicator columns of the categorical columns of ``frame``."""
    coded = pd.get_dummies(frame.astype(str), drop_first=True, dtype=float)
    return sm.add_constant(coded, has_constant="add")


def _fill_additive(cells: np.ndarray) -> np.ndarray:
    """Block x cell x column cell means with their holes (NaN) filled from the additive model cell + block,
    fitted by least squares (scipy) per column, over the blocks and cells that have a value for it
    (columns with the same holes share one fit). Where the blocks share too few cells for the model to
    be determined, the holes stay."""
    blocks, count, columns = cells.shape
    flat = cells.reshape(blocks * count, columns).copy()
    holes = np.isnan(flat)
    patterns: dict[bytes, list[int]] = {}
    for j in range(columns):
        if holes[:, j].any() and not holes[:, j].all():
            patterns.setdefault(holes[:, j].tobytes(), []).append(j)
    for which in patterns.values():
        seen = ~holes[:, which[0]].reshape(blocks, count)
        active_blocks, active_cells = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
        block_of, cell_of = np.divmod(np.arange(len(active_blocks) * len(active_cells)), len(active_cells))
        rows = active_blocks[block_of] * count + active_cells[cell_of]
        design = np.column_stack(
            [np.ones(len(rows)), np.eye(len(active_blocks))[block_of][:, 1:], np.eye(len(active_cells))[cell_of][:, 1:]]
        )  # intercept, block and cell indicators (treatment coding), one row per (block, cell)
        known = seen.reshape(-1)[rows]
        coef, _, rank, _ = linalg.lstsq(design[known], flat[np.ix_(rows[known], which)])
        if rank == design.shape[1]:
            flat[np.ix_(rows[~known], which)] = design[~known] @ coef
    return flat.reshape(blocks, count, columns)


def _block_means(cells: np.ndarray, blocks: pd.Index) -> pd.Series:
    """One column's block means from its block x cell array of cell means (NaN: not run)."""
    missing = np.isnan(cells)
    rows = ~missing.all(axis=1)
    a, missing, index = cells[rows], missing[rows], blocks[rows]
    if a.size == 0 or missing.all():
        return pd.Series(dtype=float)
    present = a[~missing]
    if (present == present[0]).all():  # e.g. a component switched off everywhere: exactly that, no round-off
        return pd.Series(present[0], index=index, dtype=float)
    return pd.Series(np.nanmean(a, axis=1), index=index)


def block_table(values: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """Block x column table: each block's mean over the cells of ``values``' runs, per column. Copies are
    merged first (a distinct run: the mean of its runs; one that merges bit-identical configs, a factor
    that changes nothing, stands for the first of them, so every block maps equivalent configs to the
    same cell); a block lacking a cell gets the additive model's value for it; NaN where a block has no
    value at all."""
    columns = list(values.columns)
    if values.empty:
        return pd.DataFrame(columns=columns, dtype=float)
    index = values.index
    units, unit_count = _codes(layout.units.loc[index])
    blocks, block_index = pd.factorize(layout.blocks.loc[index], sort=True)
    cell_codes, _ = _codes(layout.cells.loc[index])
    unit_values = _group_means(units, unit_count, values.to_numpy(dtype=float))
    unit_block = np.zeros(unit_count, dtype=int)
    unit_block[units] = blocks  # every run of a distinct run is in its block (design.block_ids)
    unit_cell = np.full(unit_count, np.iinfo(np.int64).max)
    np.minimum.at(unit_cell, units, cell_codes)
    cells, cell_count = _codes(pd.Series(unit_cell))
    pair = unit_block * cell_count + cells
    cell_means = _group_means(pair, len(block_index) * cell_count, unit_values)
    cell_means = cell_means.reshape(len(block_index), cell_count, len(columns))
    filled = _fill_additive(cell_means) if np.isnan(cell_means).any() else cell_means
    for j in range(len(columns)):  # a cell that no block ran for this column is not part of its study
        filled[:, np.isnan(cell_means[:, :, j]).all(axis=0), j] = np.nan
    blocks_index = pd.Index(block_index, name="block")
    table = pd.DataFrame({c: _block_means(filled[:, :, j], blocks_index) for j, c in enumerate(columns)})
    table.index.name = "block"
    return table


def _codes(labels: pd.Series) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(labels, sort=True)
    return codes, len(uniques)


def over_blocks(values: pd.Series, layout: Layout, confidence: float = CONFIDENCE) -> Summary:
    """The study's mean of ``values`` (one per run) with its t-interval over the block means."""
    return summarize(block_table(values.to_frame(), layout).iloc[:, 0], confidence)


def anova_p(means: pd.DataFrame) -> float:
    """p of the F test of the levels in the ANOVA of block means on level + block (``means``: block x
    level): the restricted model block-only against level + block, statsmodels' ``compare_f_test``. NaN
    without a residual degree of freedom or without residual spread (every block the same difference)."""
    long = means.stack().dropna().rename("value").reset_index()
    long.columns = ["block", "level", "value"]
    if long["level"].nunique() < 2 or long["block"].nunique() < 2:
        return math.nan
    y = long["value"].to_numpy()
    full = sm.OLS(y, _dummies(long[["block", "level"]]).to_numpy()).fit()
    if full.df_resid < 1 or not full.ssr > 1e-20 * max(1.0, float(np.sum(y**2))):
        return math.nan
    restricted = sm.OLS(y, _dummies(long[["block"]]).to_numpy()).fit()
    return float(full.compare_f_test(restricted)[1])


def _summary_row(s: Summary) -> dict:
    return {"blocks": s.n, "mean": s.mean, "sd": s.sd, "ci_low": s.ci_low, "ci_high": s.ci_high}


@dataclass(frozen=True)
class Levels:
    """A factor's block means per level (each a block x metric table) and the counts behind them."""

    factor: Factor
    means: dict[str, pd.DataFrame]
    runs: dict[str, int]
    distinct: dict[str, pd.Series]  # level -> distinct runs with a value, per metric


def levels_of(values: pd.DataFrame, factor: Factor, layout: Layout) -> Levels:
    means, runs, distinct = {}, {}, {}
    for level in factor.order:
        at_level = values[factor.levels == level]
        means[level] = block_table(at_level, layout)
        runs[level] = len(at_level)
        distinct[level] = at_level.notna().groupby(layout.units.loc[at_level.index]).any().sum()
    return Levels(factor, means, runs, distinct)


def factor_table(levels: Levels, metrics: list[str]) -> pd.DataFrame:
    """Long table: one row per (level, metric) with ``runs`` (finished runs at the level),
    ``distinct_runs`` (copies merged) and ``blocks`` (the n of the interval), the mean over the blocks
    of the level's block means, their sd and the 95% t-interval over blocks."""
    rows = []
    for level, table in levels.means.items():
        for metric in metrics:
            s = summarize(table[metric]) if metric in table else summarize([])
            row = {"factor": levels.factor.name, "level": level, "metric": metric, "runs": levels.runs[level]}
            rows.append({**row, "distinct_runs": int(levels.distinct[level].get(metric, 0)), **_summary_row(s)})
    return pd.DataFrame(rows, columns=FACTOR_COLUMNS)


def effects_table(levels: Levels, metrics: list[str]) -> pd.DataFrame:
    """Long table: one row per (non-reference level, metric): the within-block difference from the
    factor's first level, averaged over the blocks that ran both (``blocks``), its sd over blocks, the
    95% t-interval and p of the paired contrast, and ``anova_p``: all levels tested at once (with two
    levels, the same test as the paired one)."""
    rows = []
    order = list(levels.means)
    if len(order) < 2:
        return pd.DataFrame(rows, columns=EFFECT_COLUMNS)
    reference = order[0]
    for metric in metrics:
        means = pd.DataFrame({level: levels.means[level].get(metric) for level in order}, dtype=float)
        means.columns.name = "level"
        contrasts = {level: summarize((means[level] - means[reference]).dropna()) for level in order[1:]}
        together = p_value(contrasts[order[1]]) if len(order) == 2 else anova_p(means)
        for level, s in contrasts.items():
            rows.append(
                {"factor": levels.factor.name, "metric": metric, "level": level, "reference": reference,
                 **_summary_row(s), "p": p_value(s), "anova_p": together}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def gap_ranking(means: pd.DataFrame, components: list[str]) -> pd.DataFrame:
    """Gap components over the study's blocks (``means``: block x component), largest absolute mean
    first, each with its p-value, its Holm-adjusted p over the components tested together, and its
    verdict."""
    rows = []
    for component in components:
        s = summarize(means[component]) if component in means else summarize([])
        rows.append({"component": component, **_summary_row(s), "p": p_value(s)})
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm(frame["p"])
    tests = int(frame["p"].notna().sum())
    frame["verdict"] = [
        verdict(Summary(r.blocks, r.mean, r.sd, r.ci_low, r.ci_high), None if math.isnan(r.p_holm) else r.p_holm, tests)
        for r in frame.itertuples()
    ]
    order = frame["mean"].abs().fillna(-1).sort_values(ascending=False, kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def total_row(block_means: pd.Series) -> dict:
    """The total gap over blocks, tested alone (outside the components' Holm family)."""
    s = summarize(block_means)
    return {"component": "total", **_summary_row(s), "p": p_value(s), "p_holm": math.nan, "verdict": verdict(s)}


# ---------------------------------------------------------------------------------------------------
# How many blocks a precision needs


def t_quantile(blocks: int, confidence: float = CONFIDENCE) -> float:
    """The Student-t quantile of a two-sided interval over ``blocks`` blocks (``blocks - 1`` df)."""
    return float(stats.t.ppf((1 + confidence) / 2, blocks - 1))


def half_width(sd: float, blocks: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the t-interval of a mean over ``blocks`` blocks whose block means spread by ``sd``."""
    if blocks < 2:
        return math.inf
    return t_quantile(blocks, confidence) * sd / math.sqrt(blocks)


def blocks_for(sd: float, target: float, most: int = 1000) -> int | None:
    """The fewest blocks whose interval's half-width is at most ``target`` at this ``sd`` (None: > most)."""
    blocks = np.arange(2, most + 1)
    widths = stats.t.ppf((1 + CONFIDENCE) / 2, blocks - 1) * sd / np.sqrt(blocks)
    enough = np.flatnonzero(widths <= target)
    return int(blocks[enough[0]]) if enough.size else None

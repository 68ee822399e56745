"""The Markdown of ``ablate-report``: the first lines (which runs count, the replicate design, runs at
chance), one table per factor, and the gap verdicts. Pure string building from the tables that
``stats`` and ``design`` compute, so the wording lives in one place."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd

from .. import record as rec
from ..console import points
from ..record import VAL_ACCURACY
from . import design as rd
from . import stats as rs

SIGNED = {m for m in rec.STUDY_METRICS if m.startswith(rec.GAP_PREFIX)}
_MEANING = {
    "lag": "Keras's training accuracy is averaged over the epoch while the weights still improve",
    "batchnorm": "BatchNorm normalises training batches with batch statistics, validation with moving ones",
    "dropout": "dropout is on for training and off for validation",
    "augmentation": "training images are augmented, validation images are not",
    "split": "what is left: the validation images themselves are easier or harder (or luck, for few images)",
}
AT_CHANCE_VERDICT = "noise: the model is at chance"


def format_cell(row: pd.Series | dict, signed: bool) -> str:
    """``mean ± sd [low, high]`` in percentage points over distinct runs; one run has no interval."""
    if row["n"] == 0:
        return "–"
    mean = points(row["mean"], signed)
    if row["n"] == 1:
        return f"{mean} (n=1)"
    if row["sd"] == 0:
        return f"{mean} (no variation, n={row['n']})"
    low, high = points(row["ci_low"], signed), points(row["ci_high"], signed)
    cell = f"{mean} ± {100 * row['sd']:.1f} [{low}, {high}]"
    return cell if row["n"] == row["runs"] else f"{cell} (n={row['n']})"


def _runs(n: int, singular: str, plural: str) -> str:
    return f"{n} run {singular}" if n == 1 else f"{n} runs {plural}"


def identity_line(factor: str, identity: rd.Identity) -> list[str]:
    if identity.changes_nothing:
        return [
            f"**Identical runs: this factor changes nothing.** Its levels gave bit-identical models "
            f"(same `{rec.WEIGHTS_DIGEST_TAG}`) in every comparison ({identity.compared}) of runs that differ only in "
            f"`{factor}`; each such model counts once in every interval.",
            "",
        ]
    if identity.identical:
        return [
            f"Identical runs in {identity.identical} of {identity.compared} comparisons: there `{factor}` "
            "changed nothing (bit-identical models), and each such model counts once.",
            "",
        ]
    return []


def factor_markdown(
    factor: rs.Factor, table: pd.DataFrame, identity: rd.Identity, chance: dict[str, bool | None]
) -> list[str]:
    lines = [f"### {factor.name}", "", *identity_line(factor.name, identity)]
    if factor.covers:
        lines += [f"The choice `{factor.name}=...` sets {', '.join(f'`{k}`' for k in factor.covers)}.", ""]
    if factor.note:
        lines += [f"Binned: {factor.note}.", ""]
    levels = list(factor.order)
    at_chance = [v for v in levels if chance.get(v)]
    if at_chance:
        lines += [
            f"At chance (validation accuracy not distinguishably above the majority-class rate): "
            f"{', '.join(f'`{v}`' for v in at_chance)}. Their gap components are noise.",
            "",
        ]
    first = table.drop_duplicates("level").set_index("level")
    distinct = table[table["metric"] == VAL_ACCURACY].set_index("level")["n"]
    lines.append("| metric | " + " | ".join(f"`{v}`" for v in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    lines.append("| runs | " + " | ".join(str(first.loc[v, "runs"]) for v in levels) + " |")
    lines.append("| distinct runs | " + " | ".join(str(distinct[v]) for v in levels) + " |")
    marks = {True: "**yes**", False: "no", None: "?"}
    lines.append("| at chance | " + " | ".join(marks[chance.get(v)] for v in levels) + " |")
    for metric in rec.STUDY_METRICS:
        cells = table[table["metric"] == metric].set_index("level")
        if cells["n"].sum() == 0:
            continue
        lines.append(f"| {metric} | " + " | ".join(format_cell(cells.loc[v], metric in SIGNED) for v in levels) + " |")
    return [*lines, ""]


def verdict_line(row: pd.Series | dict) -> str:
    """``dropout: +4.1 points [3.2, 5.0] (Holm p 0.004) — real``"""
    name, verdict = row["component"], row["verdict"]
    if row["n"] == 0:
        return f"- **{name}**: {verdict}"
    mean = points(row["mean"], True)
    if row["n"] == 1 or row["sd"] == 0:
        return f"- **{name}**: {mean} points (n={row['n']}) — {verdict}"
    low, high = points(row["ci_low"], True), points(row["ci_high"], True)
    holm = row.get("p_holm")
    p = f", Holm p {holm:.3g}" if isinstance(holm, float) and holm == holm else ""
    return f"- **{name}**: {mean} points [{low}, {high}] (n={row['n']}{p}) — {verdict}"


def counts_line(kinds: pd.Series) -> str:
    counts = kinds.value_counts()
    used = int(counts.get("finished", 0))
    left_out = [
        f"{int(counts.get(k, 0))} {label}"
        for k, label in (
            ("failed", "failed or killed"),
            ("pruned", "pruned"),
            ("running", "still running"),
            ("reproduction", "reproductions (copies of other runs)"),
        )
    ]
    return f"**{used} finished runs** are compared; left out of every statistic: {', '.join(left_out)}."


def design_lines(merged: rd.Merges, design: rd.Design, identical_factors: list[str]) -> list[str]:
    """The replicate design: what varies between replicates, and how many distinct runs there are."""
    why = []
    if merged.reruns:
        repeats = _runs(merged.reruns, "repeats", "repeat")
        why.append(f"{repeats} the config and seeds of another run (a rerun is one replicate)")
    if merged.identical:
        same = _runs(merged.identical, "is", "are")
        why.append(f"{same} bit-identical to a run with another config (same `{rec.WEIGHTS_DIGEST_TAG}`)")
    merged_text = f": {'; '.join(why)}" if why else ""
    lines = [
        f"**Replicate design: {merged.units} distinct runs** out of {merged.runs} finished{merged_text}. "
        "Every n below counts distinct runs. " + rd.covers_sentence(design),
        "",
    ]
    if identical_factors:
        names = ", ".join(f"`{f}`" for f in identical_factors)
        lines += [f"**Identical runs: {names} changes nothing** (bit-identical models at every level).", ""]
    return lines


def chance_lines(study: bool | None, runs_at_chance: list[str], total: int, levels: list[str]) -> list[str]:
    """Said before any component: a model at the majority-class rate has learnt nothing to decompose."""
    if study is None:
        return ["Majority-class rate unknown (the runs logged no `data.count.val.*` params).", ""]
    if study:
        return [
            "**At chance: this study's validation accuracy is not distinguishably above the majority-class "
            "rate of its validation split. Every gap component below is noise.**",
            "",
        ]
    if not runs_at_chance:
        return []
    named = ", ".join(runs_at_chance[:10]) + (", ..." if len(runs_at_chance) > 10 else "")
    where = f" Levels at chance: {', '.join(levels)}." if levels else ""
    return [
        f"**{len(runs_at_chance)} of {total} runs are at chance** (the 95% Wilson interval of their validation "
        f"accuracy reaches down to the majority-class rate, or lies below it): {named}. Their gap components "
        f"are noise.{where}",
        "",
    ]


def header_lines(title: str, uri: str, kinds: pd.Series) -> list[str]:
    return [
        f"# Ablation report: {title}",
        "",
        f"Tracking store `{uri}`, generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `ablate-report`.",
        "",
        counts_line(kinds),
        "",
    ]


def method_lines(factors: list[rs.Factor]) -> list[str]:
    return [
        "Swept keys (params that vary across the finished runs, seeds excepted): "
        + (", ".join(f"`{f.name}` ({len(f.order)} levels)" for f in factors) or "none")
        + ".",
        "",
        "Every number is a run's final-epoch value in percentage points: mean ± standard deviation over the "
        f"distinct runs at that level (pooled over seeds and the other factors), the {rs.CONFIDENCE:.0%} "
        "t-interval of the mean in brackets. With 2 distinct runs the interval is the mean ± 12.7 sd/√2 and "
        "may run past 0 or 100: that is the honest answer; more seeds narrow it. Exact values: "
        "`factors.csv`, `gap_components.csv`, `runs.csv`.",
        "",
    ]


def gap_markdown(ranking: pd.DataFrame, total: pd.Series, has_figure: bool, at_chance: bool | None) -> list[str]:
    tests = int(ranking["p"].notna().sum())
    lines = [
        "## Why does validation beat training?",
        "",
        "Final-epoch gap (validation − training accuracy, percentage points) averaged over the distinct "
        "runs, split into its causes and ranked by size. A positive component lifts validation above "
        f'training. The {len(ranking)} components are tested at once: "real" means the component\'s 95% '
        f"interval excludes zero and its Holm-adjusted p-value (over the {tests} components with a spread) "
        'is below 0.05, so the chance of any false "real" in this list stays at 5%. The intervals shown '
        "are per component.",
        "",
    ]
    if at_chance:
        lines += ["**At chance: the components below are noise.**", ""]
    lines += [verdict_line(total), ""]
    for _, row in ranking.iterrows():
        lines.append(verdict_line(row) + f"  \n  _{_MEANING.get(row['component'], '')}_")
    lines.append("")
    if has_figure:
        lines += ["![gap decomposition](gap_decomposition.png)", ""]
    return lines

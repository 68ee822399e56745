"""The Markdown of ``ablate-report``: the first lines (which runs count, the design found: factors,
replicate keys, independent blocks, what each interval is over and how wide it is; runs at chance), one
table per factor with its within-block effects, and the gap verdicts. Pure string building from the
tables that ``blocked``, ``stats`` and ``design`` compute, so the wording lives in one place."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd

from .. import record as rec
from ..console import gap_leader, points
from ..gap.sentence import lead
from ..record import VAL_ACCURACY
from . import blocked
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


def _without_interval(row: pd.Series | dict, signed: bool, constant: str) -> str | None:
    """The cell of a mean that has no interval (none measured, one block, no spread); None otherwise."""
    n = int(row["blocks"])
    if n == 0:
        return "–"
    mean = points(row["mean"], signed)
    if n == 1:
        return f"{mean} (1 block)"
    if row["sd"] == 0:
        return f"{mean} ({constant.format(n=n)})"
    return None


def format_cell(row: pd.Series | dict, signed: bool, blocks: int | None = None) -> str:
    """``mean ± sd [low, high]`` in percentage points: the mean over blocks, the sd of the block means and
    the t-interval over blocks; ``(n=k)`` where this cell has fewer blocks than ``blocks``."""
    plain = _without_interval(row, signed, "no variation, {n} blocks")
    if plain is not None:
        return plain
    low, high = points(row["ci_low"], signed), points(row["ci_high"], signed)
    cell = f"{points(row['mean'], signed)} ± {100 * row['sd']:.1f} [{low}, {high}]"
    return cell if blocks is None or int(row["blocks"]) == blocks else f"{cell} (n={int(row['blocks'])})"


def effect_cell(row: pd.Series | dict) -> str:
    """A within-block difference: ``+1.7 [+0.7, +2.6], p 0.01`` over the blocks that ran both levels."""
    plain = _without_interval(row, True, "the same in all {n} blocks")
    if plain is not None:
        return plain
    low, high = points(row["ci_low"], True), points(row["ci_high"], True)
    return f"{points(row['mean'], True)} [{low}, {high}], p {row['p']:.2g}"


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
    factor: rs.Factor,
    table: pd.DataFrame,
    effects: pd.DataFrame,
    identity: rd.Identity,
    chance: dict[str, bool | None],
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
    cell = {(r["level"], r["metric"]): r for r in table.to_dict("records")}
    accuracy = {v: cell[v, VAL_ACCURACY] for v in levels}
    lines.append("| metric | " + " | ".join(f"`{v}`" for v in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    for label, key in (("runs", "runs"), ("distinct runs", "distinct_runs"), ("blocks", "blocks")):
        lines.append(f"| {label} | " + " | ".join(str(accuracy[v][key]) for v in levels) + " |")
    marks = {True: "**yes**", False: "no", None: "?"}
    lines.append("| at chance | " + " | ".join(marks[chance.get(v)] for v in levels) + " |")
    for metric in rec.STUDY_METRICS:
        if all(cell[v, metric]["blocks"] == 0 for v in levels):
            continue
        row = [format_cell(cell[v, metric], metric in SIGNED, int(accuracy[v]["blocks"])) for v in levels]
        lines.append(f"| {metric} | " + " | ".join(row) + " |")
    return [*lines, "", *effect_markdown(factor, effects)]


def effect_markdown(factor: rs.Factor, effects: pd.DataFrame) -> list[str]:
    """The within-block contrasts of a factor: each level minus the first, paired over blocks."""
    if effects.empty or effects["blocks"].max() == 0:
        return []
    reference = effects["reference"].iloc[0]
    levels = list(dict.fromkeys(effects["level"]))
    several = len(levels) > 1
    lines = [
        f"Effect within blocks (each level minus `{reference}` in the same block, mean over the blocks that ran "
        "both [95% interval], p of the paired t-test"
        + ("; last column: all levels tested at once, F test of the block means on level + block" if several else "")
        + "):",
        "",
        "| metric | " + " | ".join(f"`{v}` − `{reference}`" for v in levels) + (" | all levels |" if several else " |"),
        "|---|" + "---|" * (len(levels) + several),
    ]
    found = {(r["metric"], r["level"]): r for r in effects.to_dict("records")}
    for metric in rec.STUDY_METRICS:
        rows = [found[metric, v] for v in levels if (metric, v) in found]
        if not rows or all(r["blocks"] == 0 for r in rows):
            continue
        cells = [effect_cell(r) for r in rows]
        if several:
            together = rows[0]["anova_p"]
            cells.append(f"p {together:.2g}" if together == together else "–")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def verdict_line(row: pd.Series | dict) -> str:
    """``dropout: +4.1 points [3.2, 5.0] (3 blocks, Holm p 0.004) — real``"""
    name, verdict = row["component"], row["verdict"]
    n = int(row["blocks"])
    if n == 0:
        return f"- **{name}**: {verdict}"
    mean = points(row["mean"], True)
    blocks = "1 block" if n == 1 else f"{n} blocks"
    if n == 1 or row["sd"] == 0:
        return f"- **{name}**: {mean} points ({blocks}) — {verdict}"
    low, high = points(row["ci_low"], True), points(row["ci_high"], True)
    holm = row.get("p_holm")
    p = f", Holm p {holm:.3g}" if isinstance(holm, float) and holm == holm else f", p {row['p']:.3g}"
    return f"- **{name}**: {mean} points [{low}, {high}] ({blocks}{p}) — {verdict}"


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


def _keys_text(blocks: rd.Blocks, design: rd.Design) -> str:
    if not blocks.keys:
        fixed = ", ".join(f"`{k}={v}`" for k, v in design.fixed.items())
        return f"none ({fixed} in every run)"
    text = ", ".join(f"`{k}` ({design.varying[k]} values)" for k in blocks.keys)
    paired = len(blocks.keys) > 1 and not blocks.merged and blocks.combinations == max(design.varying.values())
    return text + (", paired (one `data.seed` per `seed`)" if paired else "")


def design_found_lines(factors: list[rs.Factor], configs: int, blocks: rd.Blocks, design: rd.Design) -> list[str]:
    """The first thing a reader learns: factors, replicate keys, independent blocks, what an interval is
    over and which noise it covers."""
    swept = ", ".join(f"`{f.name}` ({len(f.order)} levels)" for f in factors) or "none"
    count = blocks.count
    named = "; ".join(f"`{blocks.labels[b]}`" for b in sorted(blocks.labels)[:6]) + ("; ..." if count > 6 else "")
    head = (
        f"**Design found.** Factors: {swept}; {configs} config{'s' if configs != 1 else ''}. Replicate keys "
        f"that vary: {_keys_text(blocks, design)}. **{count} independent block{'s' if count != 1 else ''}**"
    )
    if blocks.merged:
        head += (
            f": the {blocks.combinations} combinations of {', '.join(f'`{k}`' for k in blocks.keys)} share "
            "values (the keys are crossed), and runs that share a seed share its noise, so they are not "
            f"independent; they form {count} block{'s' if count != 1 else ''} ({named}). Pair the keys "
            "(`data: {seed: ${seed}}` in the study's YAML) for one independent block per seed."
        )
    elif blocks.keys:
        head += f" ({named})."
    else:
        head += "."
    if blocks.missing:
        short = "; ".join(f"`{blocks.labels[b]}` lacks {m}" for b, m in sorted(blocks.missing.items()))
        head += (
            f" **Unbalanced**: {short} of the configs (a failed, pruned or left-out job). A block's mean over "
            "the configs takes the missing ones from the additive model config + block (least squares)."
        )
    elif count > 1 and configs > 1:
        head += " Every config ran in every block."
    lines = [head, ""]
    if count >= 2:
        lines += [
            f"Every interval below is over these {count} blocks (n = {count}, {count - 1} degree"
            f"{'s' if count != 2 else ''} of freedom), never over runs: the runs of one block share their seeds' "
            "noise and count once. A mean over the study (a gap component, the total, a level's mean) averages "
            "within each block first, then over the blocks; a factor's effect is the difference between its "
            "levels within each block, averaged over the blocks (paired), so the noise a block shares cancels. "
            + rd.covers_sentence(design),
            "",
        ]
    else:
        lines += [
            "**One block: no interval anywhere.** Every run shares the same replicate noise, so each number "
            "below is one measurement, and the spread between configs is not noise to average over. Repeat "
            "the study over seeds (e.g. `seed=1,2,3,4,5`, with `data.seed` following the seed) for intervals.",
            "",
        ]
    return lines


def precision_lines(count: int, spread: dict[str, float]) -> list[str]:
    """How wide an interval is with this many blocks, and how many blocks a precision would need, from the
    observed between-block sd of each gap mean (``spread``: name -> sd, in accuracy units)."""
    spread = {k: v for k, v in spread.items() if v == v and v > 0}
    if count < 2 or not spread:
        return []
    name = "total" if "total" in spread else max(spread, key=spread.get)
    widest = max(spread, key=spread.get)
    t = blocked.t_quantile(count)

    def at(sd: float, k: int) -> str:
        return f"±{100 * blocked.half_width(sd, k):.1f}"

    def needed(sd: float, target: float) -> str:
        k = blocked.blocks_for(sd, target)
        return f"about {k} blocks" if k is not None else "more than 1000 blocks"

    sd = spread[name]
    more = ", ".join(f"{at(sd, k)} with {k}" for k in (5, 10, 20) if k > count)
    text = (
        f"**{'With only ' if count < 10 else 'With '}{count} blocks the intervals are "
        f"{'wide' if count < 10 else 'as below'}**: the 95% half-width is t · sd / √{count} with t = {t:.2f} "
        f"on {count - 1} degree{'s' if count != 2 else ''} of freedom. At the observed between-block sd of the "
        f"{name} gap ({100 * sd:.1f} points) that is {at(sd, count)} points"
        + (f"; it would be {more} blocks" if more else "")
        + f"; ±1 point needs {needed(sd, 0.01)}, ±2 points {needed(sd, 0.02)}."
    )
    if widest != name:
        text += (
            f" The most variable component, `{widest}` (sd {100 * spread[widest]:.1f} points), needs "
            f"{needed(spread[widest], 0.01)} for ±1 point."
        )
    text += f" (The sd itself is estimated from {count} blocks: a rough guide.) One block is one more `seed`."
    return [text, ""]


def copies_lines(merged: rd.Merges, identical_factors: list[str]) -> list[str]:
    """How many distinct runs the finished runs are, and why some were merged."""
    why = []
    if merged.reruns:
        repeats = _runs(merged.reruns, "repeats", "repeat")
        why.append(f"{repeats} the config and seeds of another run (a rerun is one replicate)")
    if merged.identical:
        same = _runs(merged.identical, "is", "are")
        why.append(f"{same} bit-identical to a run with another config (same `{rec.WEIGHTS_DIGEST_TAG}`)")
    merged_text = f": {'; '.join(why)}" if why else ""
    lines = [
        f"**{merged.units} distinct runs** out of {merged.runs} finished{merged_text}. Copies count once, "
        "inside their block.",
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


def method_lines() -> list[str]:
    return [
        "Every number is a run's final-epoch value in percentage points. A table cell is the mean over blocks "
        "± the standard deviation of the block means, with the 95% t-interval over blocks in brackets; "
        "`(n=k)` marks a cell with fewer blocks than its level. With 2 blocks the interval is the mean "
        "± 12.7 sd/√2 and may run past 0 or 100: that is the honest answer; more seeds narrow it. Exact "
        "values: `factors.csv`, `effects.csv`, `gap_components.csv`, `runs.csv`.",
        "",
    ]


_HEADINGS = {
    "validation beats training": "Why does validation beat training?",
    "training beats validation": "Why does training beat validation?",
    "level": "Validation and training are level: what is in the gap?",
    "not measured": "The gap between validation and training",
}


def gap_heading(total: float) -> str:
    """The section's question follows the sign of the study's total gap (0.0 points: level)."""
    return _HEADINGS[gap_leader(total)]


def gap_markdown(ranking: pd.DataFrame, total: pd.Series, has_figure: bool, at_chance: bool | None) -> list[str]:
    tests = int(ranking["p"].notna().sum())
    blocks = int(total["blocks"])
    said = lead(total["mean"])
    lines = [
        f"## {gap_heading(total['mean'])}",
        "",
        f"On average over the study's {blocks} block{'s' if blocks != 1 else ''}, {said} at the final epoch. "
        "The gap (validation − training accuracy, percentage points) is split into its causes, each "
        "averaged within every block first, then over the blocks, and ranked by size. A positive component "
        f'lifts validation above training. The {len(ranking)} components are tested at once: "real" means '
        "the component's 95% interval over blocks excludes zero and its Holm-adjusted p-value (over the "
        f'{tests} components with a spread) is below 0.05, so the chance of any false "real" in this list '
        "stays at 5%. The intervals shown are per component; the total is tested on its own.",
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

"""The gap in words: one sentence per phase (``gap_summary.txt`` of a run, ``GapCallback.summary()``), and
the headline the figure and the report take from the total's sign."""

from __future__ import annotations

from .. import record as rec
from ..chance import accuracy_interval, at_chance
from ..console import gap_leader, points
from .decomposition import COMPONENTS

# What each component contains (docs/gap-measurement.md), with the effects removed in one order...
_LAG = (
    "lag = Keras's epoch-averaged training number vs the end-of-epoch weights on the very batches, "
    "augmentations and dropout masks the epoch trained on (the weights' movement alone: 0 with still weights); "
)
_SPLIT = "split = validation vs the clean training split (the real generalisation gap)."
LEGEND = (
    _LAG + "batchnorm = BatchNorm on batch vs moving statistics; dropout = dropout on vs off, given BatchNorm "
    "off; augmentation = the epoch's augmented vs the same clean images, given both off (an interaction of "
    "two effects lands in the one removed first); " + _SPLIT
)
# ... or each averaged over all six orders (diagnostics.attribution=shapley)
LEGEND_SHAPLEY = (
    _LAG + "batchnorm, dropout, augmentation = what removing each changes (BatchNorm to moving statistics, "
    "dropout off, clean images), averaged over all six orders of removing the three (Shapley values: no "
    "interaction lands in one alone); " + _SPLIT
)
# without a replay of the epoch (GapCallback on a dataset whose training order it cannot know)
LEGEND_OWN_DRAWS = (
    " The measurement could not replay the epoch's batches and draws: lag also holds the difference between "
    "training's augmentations and dropout masks and the measurement's own."
)


def lead(total: float) -> str:
    """Who beats whom, by how much: the total as it rounds (to 0.1 points), "level" when it rounds to 0
    (``console.gap_leader``, the one rule for who leads)."""
    leader = gap_leader(total)
    if leader == "level":
        return "validation and training are level (0.0 points)"
    if leader == "not measured":
        return "the gap was not measured"
    return f"{leader} by {points(abs(total), False)} points"


_HEADLINES = {
    "validation beats training": "Why validation beats training: the gap, decomposed",
    "training beats validation": "Why training beats validation: the gap, decomposed",
    "level": "Validation and training level: the gap, decomposed",
}


def headline(total: float) -> str:
    """A title that follows the total's sign: why training beats validation when it does."""
    return _HEADLINES.get(gap_leader(total), "The gap between validation and training")


def gap_sentence(row: dict[str, float]) -> str:
    """One plain sentence: the total gap and its components by size, in accuracy points."""
    parts = sorted(COMPONENTS, key=lambda c: -abs(row[rec.gap_metric(c)]))
    listed = ", ".join(f"{c} {points(row[rec.gap_metric(c)])}" for c in parts)
    return f"{lead(row[rec.GAP_TOTAL])}: {listed}"


def _phase_chance(row: dict, val_count: int | None, majority: float | None) -> str:
    """The phase's own at-chance check: its last measured epoch's validation accuracy against the
    majority-class rate (the project's one rule, chance.at_chance), as a note for its line."""
    if not val_count or majority is None or rec.VAL_ACCURACY not in row:
        return ""
    accuracy = float(row[rec.VAL_ACCURACY])
    if not at_chance(accuracy, val_count, majority):
        return ""
    low, high = accuracy_interval(accuracy, val_count)
    return (
        f", AT CHANCE (val_accuracy {accuracy:.3f}, 95% interval {low:.3f}-{high:.3f}, majority-class rate "
        f"{majority:.3f}: these components are noise)"
    )


def gap_summary(
    rows: list[dict],
    warning: str | None = None,
    *,
    val_count: int | None = None,
    majority: float | None = None,
    replayed: bool = True,
    attribution: str = "ordered",
) -> str:
    """The sentence for the last measured epoch of each phase (``gap_summary.txt``), after the run's
    at-chance ``warning`` if there is one. Given the validation size and its majority-class rate, each
    phase's line carries its own chance check; ``replayed``: whether the measurement replayed the epochs'
    own batches and draws (the legend says what lag holds otherwise); ``attribution``: how the three
    middle components share their interactions (``diagnostics.attribution``)."""
    lines = [warning, ""] if warning else []
    for phase in sorted({r["phase"] for r in rows}):
        measured = [r for r in rows if r["phase"] == phase and rec.GAP_TOTAL in r]
        if measured:
            last = measured[-1]
            chance = _phase_chance(last, val_count, majority)
            # epochs counted from 1 as the console prints them; MLflow's step is the epoch index
            where = f"phase {phase}, epoch {last['epoch'] + 1} (step {last['epoch']})"
            lines.append(f"{where}{chance}: {gap_sentence(last)}")
    if not any(line.startswith("phase ") for line in lines):
        lines.append("no gap measurement (diagnostics.level=off)")
        return "\n".join(lines) + "\n"
    lines.append("")
    legend = LEGEND_SHAPLEY if attribution == "shapley" else LEGEND
    lines.append(legend + ("" if replayed else LEGEND_OWN_DRAWS))
    return "\n".join(lines) + "\n"

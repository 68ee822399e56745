"""The gap in words: one sentence per phase (``gap_summary.txt`` of a run, ``GapCallback.summary()``)."""

from __future__ import annotations

from .. import record as rec
from ..console import points
from .decomposition import COMPONENTS


def gap_sentence(row: dict[str, float]) -> str:
    """One plain sentence: the total gap and its components by size, in accuracy points."""
    total = points(row[rec.GAP_TOTAL])  # the sign as written: a total that rounds to 0.0 reads as +0.0
    parts = sorted(COMPONENTS, key=lambda c: -abs(row[rec.gap_metric(c)]))
    listed = ", ".join(f"{c} {points(row[rec.gap_metric(c)])}" for c in parts)
    leader = "training beats validation" if total.startswith("-") else "validation beats training"
    lead = f"{leader} by {total[1:]} points"
    return f"{lead}: {listed}"


def gap_summary(rows: list[dict], warning: str | None = None) -> str:
    """The sentence for the last measured epoch of each phase (``gap_summary.txt``), after the
    at-chance ``warning`` if there is one."""
    lines = [warning, ""] if warning else []
    for phase in sorted({r["phase"] for r in rows}):
        measured = [r for r in rows if r["phase"] == phase and rec.GAP_TOTAL in r]
        if measured:
            last = measured[-1]
            # epochs counted from 1 as the console prints them; MLflow's step is the epoch index
            lines.append(f"phase {phase}, epoch {last['epoch'] + 1} (step {last['epoch']}): {gap_sentence(last)}")
    if not any(line.startswith("phase ") for line in lines):
        lines.append("no gap measurement (diagnostics.level=off)")
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append(
        "lag = epoch-averaged train metric vs end-of-epoch weights; batchnorm = batch vs moving statistics; "
        "dropout = dropout on vs off; augmentation = augmented vs clean images; split = validation vs "
        "clean training split (the real generalisation gap)."
    )
    return "\n".join(lines) + "\n"

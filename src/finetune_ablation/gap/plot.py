"""The gap figure: one stacked bar per epoch, each colour a component in accuracy points (a run's
``gap.png``, ``GapCallback.plot()``)."""

from __future__ import annotations

from textwrap import fill
from typing import TYPE_CHECKING

from .. import record as rec
from .decomposition import COMPONENTS
from .sentence import headline

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, in the backend the caller chose
    import matplotlib.pyplot as plt
    import pandas as pd

_COLOURS = {
    "lag": "tab:gray",
    "batchnorm": "tab:purple",
    "dropout": "tab:orange",
    "augmentation": "tab:green",
    "split": "tab:blue",
}


def mark_phase_boundary(ax: plt.Axes, history: pd.DataFrame) -> None:
    """A dotted line where phase 2 (fine-tuning) starts."""
    phase2 = history[history["phase"] == 2]
    if not phase2.empty:
        ax.axvline(phase2["epoch"].min() - 0.5, color="black", linestyle=":", label="fine-tuning starts")


def gap_chart(history: pd.DataFrame, warning: str | None = None) -> plt.Figure:
    """Stacked bars of the gap components per epoch (positive up, negative down), total marked; the title
    follows the sign of the last measured epoch's total; an at-chance ``warning`` goes first, above the
    title, in red."""
    import matplotlib.pyplot as plt

    last = rec.gap_metric(rec.GAP_COMPONENTS[-1])
    measured = history.dropna(subset=[rec.GAP_TOTAL, last]) if last in history else history.iloc[0:0]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(measured) + 3), 4.5))
    epochs = measured["epoch"].to_numpy()
    up = [0.0] * len(measured)
    down = [0.0] * len(measured)
    for component in COMPONENTS:
        values = (100 * measured[rec.gap_metric(component)]).to_list()
        bottoms = [u if v >= 0 else d for v, u, d in zip(values, up, down, strict=True)]
        ax.bar(epochs, values, bottom=bottoms, color=_COLOURS[component], label=component, width=0.7)
        up = [u + max(v, 0) for v, u in zip(values, up, strict=True)]
        down = [d + min(v, 0) for v, d in zip(values, down, strict=True)]
    ax.plot(
        epochs,
        100 * measured[rec.GAP_TOTAL],
        "k_",
        markersize=22,
        markeredgewidth=2.5,
        label="total (val - train)",
    )
    ax.axhline(0, color="black", linewidth=0.8)
    mark_phase_boundary(ax, history)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy points (validation - training)")
    last_total = float(measured[rec.GAP_TOTAL].iloc[-1]) if len(measured) else None
    ax.set_title(headline(last_total) if last_total is not None else "The gap between validation and training")
    if warning:
        ax.set_title("AT CHANCE: these components are noise\n" + ax.get_title(), color="tab:red")
        fig.text(0.01, 0.01, fill(warning, 110), fontsize=7, color="tab:red", va="bottom")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout(rect=(0, 0.12 if warning else 0, 1, 1))
    return fig

"""The learning curves logged with every run, with the phase boundary (the gap figure is gap/plot.py)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt
import pandas as pd

from ..gap.plot import mark_phase_boundary


def learning_curves(history: pd.DataFrame) -> plt.Figure:
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for column, style in (
        ("accuracy", "-o"),
        ("train_clean_accuracy", "--s"),
        ("val_accuracy", "-^"),
    ):
        if column in history:
            acc_ax.plot(history["epoch"], history[column], style, label=column, markersize=4)
    for column, style in (("loss", "-o"), ("train_clean_loss", "--s"), ("val_loss", "-^")):
        if column in history:
            loss_ax.plot(history["epoch"], history[column], style, label=column, markersize=4)
    for ax, title in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        mark_phase_boundary(ax, history)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

"""Figures of the study report: main effects per factor, the study's gap decomposition, and the learning
curves of the best and worst run. Accuracies are drawn in percentage points, error bars are the 95%
t-intervals over independent blocks of the tables, so a figure never shows more certainty than the numbers
beside it: a level measured in one block has no interval, so it gets no error bar (a zero-width bar would
claim certainty) and a ``1 block`` label instead."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..console import gap_leader
from ..record import ACCURACY, TRAIN_CLEAN_ACCURACY, VAL_ACCURACY
from .stats import ABSENT, REAL

MAIN_EFFECT_METRICS = (VAL_ACCURACY, ACCURACY, TRAIN_CLEAN_ACCURACY)
_STYLE = {VAL_ACCURACY: "-^", ACCURACY: "-o", TRAIN_CLEAN_ACCURACY: "--s"}
_VERDICT_COLOURS = {REAL: "tab:red", ABSENT: "lightgray"}


def _error_bars(table: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars from the interval columns (rows with an interval only)."""
    low = (100 * (table["mean"] - table["ci_low"])).to_numpy(dtype=float)
    high = (100 * (table["ci_high"] - table["mean"])).to_numpy(dtype=float)
    return np.vstack([low, high])


def _has_interval(table: pd.DataFrame) -> np.ndarray:
    return (table["blocks"] >= 2).to_numpy() & table["ci_low"].notna().to_numpy()


def main_effects(
    tables: dict[str, pd.DataFrame], chance: dict[str, dict[str, bool | None]], majority: float | None
) -> plt.Figure:
    """One panel per factor: mean final accuracies per level over blocks with 95% intervals over blocks;
    the majority-class rate as a dashed line, and levels at chance named so under their tick."""
    count = len(tables)
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, table) in zip(axes.flat, tables.items(), strict=False):
        levels = list(dict.fromkeys(table["level"]))
        x = np.arange(len(levels))
        for offset, metric in zip((-0.08, 0.0, 0.08), MAIN_EFFECT_METRICS, strict=True):
            rows_of = table[table["metric"] == metric].set_index("level").loc[levels]
            if rows_of["blocks"].sum() == 0:
                continue
            bars = _has_interval(rows_of)
            line = ax.plot(x + offset, 100 * rows_of["mean"], _STYLE[metric], markersize=5, label=metric)[0]
            ax.errorbar(
                (x + offset)[bars], 100 * rows_of["mean"][bars], yerr=_error_bars(rows_of[bars]), fmt="none",
                ecolor=line.get_color(), capsize=3,
            )  # fmt: skip
            for xi, yi, n in zip(x + offset, 100 * rows_of["mean"], rows_of["blocks"], strict=True):
                if n == 1 and metric == VAL_ACCURACY:
                    ax.annotate("1 block", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if majority is not None and not math.isnan(majority):
            ax.axhline(100 * majority, color="gray", linestyle="--", linewidth=1, label="majority class")
        marked = [f"{v}\n(at chance)" if chance.get(name, {}).get(v) else v for v in levels]
        ax.set_xticks(x, marked, rotation=20 if max(len(v) for v in levels) > 8 else 0, fontsize=8)
        ax.set_title(name)
        ax.set_ylim(-5, 105)  # accuracy lives in [0, 100]; a wider interval runs off the edge
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.suptitle(
        "Main effects: mean per level over independent blocks, 95% interval over blocks (none for 1 block);\n"
        "levels are compared within blocks in report.md (effects.csv)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def gap_bars(ranking: pd.DataFrame, total: pd.Series, at_chance: bool) -> plt.Figure:
    """Horizontal bars: each gap component (ranked) and the total, with their 95% intervals."""
    frame = pd.concat([ranking, total.to_frame().T], ignore_index=True)
    frame = frame[frame["blocks"] > 0].reset_index(drop=True)
    frame[["blocks", "mean", "ci_low", "ci_high"]] = frame[["blocks", "mean", "ci_low", "ci_high"]].astype(float)
    y = np.arange(len(frame))[::-1]
    colours = [
        "black" if c == "total" else _VERDICT_COLOURS.get(v, "tab:blue")
        for c, v in zip(frame["component"], frame["verdict"], strict=True)
    ]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(frame) + 1.8))
    ax.barh(y, 100 * frame["mean"], color=colours, height=0.6)
    bars = _has_interval(frame)
    ax.errorbar(100 * frame["mean"][bars], y[bars], xerr=_error_bars(frame[bars]), fmt="none", ecolor="black",
                capsize=4)  # fmt: skip
    labels = [f"{c} (1 block)" if n == 1 else c for c, n in zip(frame["component"], frame["blocks"], strict=True)]
    ax.set_yticks(y, labels)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("accuracy points (validation - training), final epoch, mean over blocks")
    title = f"{_question(float(total['mean']))} (red: real after Holm's correction)"
    if at_chance:
        title = "AT CHANCE: the components are noise\n" + title
    ax.set_title(title, color="tab:red" if at_chance else "black")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def _question(total: float) -> str:
    """The figure's title follows the sign of the total, as the report's heading does."""
    return {
        "validation beats training": "Why validation beats training",
        "training beats validation": "Why training beats validation",
        "level": "Validation and training are level: the gap's parts",
    }.get(gap_leader(total), "The gap between validation and training")


def best_worst_curves(curves: dict[str, pd.DataFrame], boundaries: dict[str, float | None]) -> plt.Figure:
    """Accuracy and loss per epoch of the best and the worst run (one row each)."""
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.8 * len(curves)), squeeze=False)
    for (title, history), (acc_ax, loss_ax) in zip(curves.items(), axes, strict=True):
        for column in MAIN_EFFECT_METRICS:
            if column in history:
                acc_ax.plot(history.index, 100 * history[column], _STYLE[column], label=column, markersize=4)
        for column, style in (("loss", "-o"), ("val_loss", "-^")):
            if column in history:
                loss_ax.plot(history.index, history[column], style, label=column, markersize=4)
        for ax, what in ((acc_ax, "accuracy (%)"), (loss_ax, "loss")):
            if boundaries.get(title) is not None:
                ax.axvline(boundaries[title], color="black", linestyle=":", label="fine-tuning starts")
            ax.set_title(f"{title}: {what}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

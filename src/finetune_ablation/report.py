"""``ablate-report``: compare the runs of a study with error bars, from any MLflow store.

    ablate-report --experiment val_beats_train --out reports/val_beats_train
    ablate-report --parent-run RUN_ID --out reports/sweep      # one Hydra multirun (its child runs)

Reads the runs with ``mlflow.search_runs`` (so it works on a remote tracking server too), leaves out
failed, pruned and running runs (and says how many), and writes Markdown, CSV and PNG into ``--out``;
a sweep's parent run gets the same files as artifacts under ``report/``. The statistics live in
``report_stats`` as pure functions, the figures in ``report_plots``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd

from . import report_plots as plots
from . import report_stats as rs
from .errors import UserError
from .paths import CONF_DIR
from .reaper import reap_once
from .runstore import default_uri, get_run, open_store, run_cli
from .sweep import REUSED_TAG

# The gap components in the order diagnostics.COMPONENTS removes them (named here, not imported, so the
# report needs no TensorFlow; a test checks the two agree).
GAP_COMPONENTS = ("lag", "batchnorm", "dropout", "augmentation", "split")
METRICS = (
    "val_accuracy",
    "accuracy",
    "train_clean_accuracy",
    "gap/total",
    *(f"gap/{c}" for c in GAP_COMPONENTS),
)
_SIGNED = {m for m in METRICS if m.startswith("gap/")}
CURVE_METRICS = ("accuracy", "val_accuracy", "train_clean_accuracy", "loss", "val_loss")
_MEANING = {
    "lag": "Keras's training accuracy is averaged over the epoch while the weights still improve",
    "batchnorm": "BatchNorm normalises training batches with batch statistics, validation with moving ones",
    "dropout": "dropout is on for training and off for validation",
    "augmentation": "training images are augmented, validation images are not",
    "split": "what is left: the validation images themselves are easier or harder (or luck, for few images)",
}


@dataclass(frozen=True)
class Scope:
    title: str
    experiment_ids: list[str]
    parent_run_id: str | None  # where the report is logged as artifacts
    parent_filter: str | None  # search filter for the parent's children


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ablate-report", description="Compare the runs of a study: factor tables with 95% intervals."
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name: every run in it")
    which.add_argument("--parent-run", metavar="RUN_ID", help="a sweep's parent run: its child runs")
    parser.add_argument("--out", help="report folder (default: reports/<experiment or parent run id>)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlruns/mlflow.db)",
    )
    return parser.parse_args(argv)


def resolve_scope(client: mlflow.MlflowClient, args: argparse.Namespace, uri: str) -> Scope:
    if args.parent_run:
        parent = get_run(client, args.parent_run, uri)
        return Scope(
            f"sweep {parent.info.run_name or parent.info.run_id}",
            [parent.info.experiment_id],
            parent.info.run_id,
            parent.info.run_id,
        )
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        raise UserError(
            f"no MLflow experiment named {args.experiment!r} in {uri}: "
            f"known experiments are {', '.join(names) or 'none'}"
        )
    return Scope(f"experiment {experiment.name}", [experiment.experiment_id], None, None)


def fetch_runs(scope: Scope) -> pd.DataFrame:
    """Every run of the scope as one pandas row; a sweep also owns the finished runs it reused."""
    if scope.parent_filter is None:
        return mlflow.search_runs(experiment_ids=scope.experiment_ids, output_format="pandas")
    frames = [
        mlflow.search_runs(experiment_ids=scope.experiment_ids, filter_string=f"tags.{tag} = '{scope.parent_filter}'")
        for tag in ("mlflow.parentRunId", f"`{REUSED_TAG}`")
    ]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["run_id", "status"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("run_id").reset_index(drop=True)


def single_parent(runs: pd.DataFrame, kinds: pd.Series) -> str | None:
    """With --experiment: the sweep's parent when every job of the experiment belongs to one sweep."""
    jobs = runs[~kinds.isin(["parent", "reproduction"])]
    column = "tags.mlflow.parentRunId"
    if column not in jobs or jobs.empty or jobs[column].isna().any() or jobs[column].nunique() != 1:
        return None
    return str(jobs[column].iloc[0])


def config_groups() -> list[str]:
    """Config-group names a Hydra override can choose (``augment=strong``): the folders of conf/."""
    return sorted({p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"experiment"})


# ---------------------------------------------------------------------------------------------------
# Markdown


def _points(value: float, signed: bool) -> str:
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def format_cell(row: pd.Series | dict, signed: bool) -> str:
    """``mean ± sd [low, high]`` in percentage points; one run has no spread, none shows a dash."""
    if row["n"] == 0:
        return "–"
    mean = _points(row["mean"], signed)
    if row["n"] == 1:
        return f"{mean} (1 run)"
    low, high = _points(row["ci_low"], signed), _points(row["ci_high"], signed)
    cell = f"{mean} ± {100 * row['sd']:.1f} [{low}, {high}]"
    return cell if row["n"] == row["runs"] else f"{cell} (n={row['n']})"


def factor_markdown(factor: rs.Factor, table: pd.DataFrame) -> list[str]:
    lines = [f"### {factor.name}", ""]
    if factor.covers:
        lines += [f"The choice `{factor.name}=...` sets {', '.join(f'`{k}`' for k in factor.covers)}.", ""]
    if factor.note:
        lines += [f"Binned: {factor.note}.", ""]
    levels = list(factor.order)
    runs = table.drop_duplicates("level").set_index("level")["runs"]
    lines.append("| metric | " + " | ".join(f"`{v}`" for v in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    lines.append("| runs | " + " | ".join(str(runs[v]) for v in levels) + " |")
    for metric in METRICS:
        cells = table[table["metric"] == metric].set_index("level")
        if cells["n"].sum() == 0:
            continue
        lines.append(f"| {metric} | " + " | ".join(format_cell(cells.loc[v], metric in _SIGNED) for v in levels) + " |")
    return [*lines, ""]


def verdict_line(row: pd.Series | dict) -> str:
    """``dropout: +4.1 points [3.2, 5.0] — real``"""
    if row["n"] == 0:
        return f"- **{row['component']}**: {row['verdict']}"
    if row["n"] == 1:
        return f"- **{row['component']}**: {_points(row['mean'], True)} points — {row['verdict']}"
    low, high = _points(row["ci_low"], True), _points(row["ci_high"], True)
    return f"- **{row['component']}**: {_points(row['mean'], True)} points [{low}, {high}] — {row['verdict']}"


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


def gap_markdown(ranking: pd.DataFrame, total: pd.Series, has_figure: bool) -> list[str]:
    lines = [
        "## Why does validation beat training?",
        "",
        "Final-epoch gap (validation − training accuracy, percentage points) averaged over every "
        "compared run, split into its causes (they add up to the total) and ranked by size. A positive "
        'component lifts validation above training. "real" means the 95% interval excludes zero.',
        "",
        verdict_line(total),
        "",
    ]
    for _, row in ranking.iterrows():
        lines.append(verdict_line(row) + f"  \n  _{_MEANING.get(row['component'], '')}_")
    lines.append("")
    if has_figure:
        lines += ["![gap decomposition](gap_decomposition.png)", ""]
    return lines


# ---------------------------------------------------------------------------------------------------
# Building the report


def study_tables(finished: pd.DataFrame, factors: list[rs.Factor]) -> dict[str, pd.DataFrame]:
    values = rs.final_metrics(finished, METRICS)
    return {f.name: rs.factor_table(values, f) for f in factors}


def gap_summary(finished: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Ranked components (named without the ``gap/`` prefix) and the total, each with its verdict."""
    values = rs.final_metrics(finished, [f"gap/{c}" for c in ("total", *GAP_COMPONENTS)])
    values.columns = [c[len("gap/") :] for c in values.columns]
    ranking = rs.gap_ranking(values, GAP_COMPONENTS)
    total = rs.summarize(values["total"])
    return ranking, pd.Series({"component": "total", **vars(total), "verdict": rs.verdict(total)})


def metric_curves(client: mlflow.MlflowClient, run_id: str) -> pd.DataFrame:
    """A run's per-epoch history of the curve metrics, indexed by epoch (the MLflow step)."""
    columns = {}
    for key in CURVE_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            columns[key] = pd.Series({m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)})
    return pd.DataFrame(columns).sort_index()


def _boundary(row: pd.Series) -> float | None:
    try:
        return int(row.get("params.train.initial_epochs")) - 0.5
    except (TypeError, ValueError):
        return None


def _run_label(row: pd.Series) -> str:
    name = row.get("tags.mlflow.runName")
    return f"{name} ({row['run_id'][:8]})" if isinstance(name, str) else str(row["run_id"])


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_section(client: mlflow.MlflowClient, finished: pd.DataFrame, out: Path) -> list[str]:
    picked = rs.best_and_worst(finished)
    if picked is None:
        return ["## Learning curves", "", "No finished run logged val_accuracy.", ""]
    rows = {
        role: finished[finished["run_id"] == rid].iloc[0] for role, rid in zip(("best", "worst"), picked, strict=True)
    }
    titles = {role: f"{role}: {_run_label(row)}" for role, row in rows.items()}
    curves = {titles[r]: metric_curves(client, row["run_id"]) for r, row in rows.items()}
    _save(
        plots.best_worst_curves(curves, {titles[r]: _boundary(row) for r, row in rows.items()}),
        out / "learning_curves.png",
    )
    lines = ["## Learning curves of the best and the worst run", ""]
    for role, row in rows.items():
        acc = row.get("metrics.val_accuracy")
        name = row.get("tags.mlflow.runName")
        named = f" ({name})" if isinstance(name, str) else ""
        lines.append(f"- {role}: run `{row['run_id']}`{named}, final val_accuracy {100 * acc:.1f}%")
    return [*lines, "", "![learning curves](learning_curves.png)", ""]


def header_lines(
    scope: Scope, uri: str, kinds: pd.Series, factors: list[rs.Factor], finished: pd.DataFrame
) -> list[str]:
    replicates = {k: rs.param_values(finished, k).nunique() for k in rs.REPLICATE_KEYS}
    lines = [
        f"# Ablation report: {scope.title}",
        "",
        f"Tracking store `{uri}`, generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `ablate-report`.",
        "",
        counts_line(kinds),
        "",
        "Swept keys (params that vary across the finished runs): "
        + (", ".join(f"`{f.name}` ({len(f.order)} levels)" for f in factors) or "none")
        + "; replicates: "
        + ", ".join(f"`{k}` ({n} values)" for k, n in replicates.items())
        + ".",
        "",
        "Every number is a run's final-epoch value in percentage points: mean ± standard deviation over the "
        f"runs at that level (pooled over seeds and the other factors), the {rs.CONFIDENCE:.0%} t-interval "
        "of the mean in brackets. Exact values: `factors.csv`, `gap_components.csv`, `runs.csv`.",
        "",
        "An interval is only as narrow as the runs allow: with 2 runs a level it is the mean ± 12.7 sd/√2 "
        "and may run past 0 or 100. That is the honest answer; more seeds narrow it.",
        "",
    ]
    return lines


def runs_table(finished: pd.DataFrame, factors: list[rs.Factor]) -> pd.DataFrame:
    """The raw rows the statistics come from, for anyone who wants to redo them."""
    frame = pd.DataFrame({"run_id": finished["run_id"], "run_name": finished.get("tags.mlflow.runName")})
    for key in rs.REPLICATE_KEYS:
        frame[key] = rs.param_values(finished, key)
    for factor in factors:
        frame[factor.name] = factor.levels
    return pd.concat([frame, rs.final_metrics(finished, METRICS)], axis=1)


def write_report(client: mlflow.MlflowClient, scope: Scope, uri: str, runs: pd.DataFrame, out: Path) -> Path:
    kinds = rs.classify(runs)
    finished = runs[kinds == "finished"]
    if finished.empty:
        raise UserError(f"no finished runs to compare in {scope.title} ({counts_line(kinds)[2:]})")
    out.mkdir(parents=True, exist_ok=True)
    factors = rs.find_factors(finished, config_groups())
    tables = study_tables(finished, factors)
    ranking, total = gap_summary(finished)

    lines = header_lines(scope, uri, kinds, factors, finished)
    has_gap = bool(ranking["n"].sum() > 0)
    if has_gap:
        _save(plots.gap_bars(ranking, total), out / "gap_decomposition.png")
    lines += gap_markdown(ranking, total, has_gap)
    lines += ["## Factors", ""]
    if tables:
        _save(plots.main_effects(tables), out / "main_effects.png")
        lines += ["![main effects](main_effects.png)", ""]
        for factor in factors:
            lines += factor_markdown(factor, tables[factor.name])
    else:
        lines += ["No swept keys: every finished run has the same config (apart from seeds).", ""]
    lines += curves_section(client, finished, out)

    columns = ["factor", "level", "runs", "metric", "n", "mean", "sd", "ci_low", "ci_high"]
    factor_rows = pd.concat(tables.values(), ignore_index=True) if tables else pd.DataFrame(columns=columns)
    factor_rows.to_csv(out / "factors.csv", index=False)
    pd.concat([ranking, total.to_frame().T], ignore_index=True).to_csv(out / "gap_components.csv", index=False)
    runs_table(finished, factors).to_csv(out / "runs.csv", index=False)
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def build(args: argparse.Namespace) -> Path:
    uri = args.tracking_uri or default_uri()
    client = open_store(uri)
    reap_once(client, uri)  # runs left RUNNING by killed processes are KILLED, not "still running"
    mlflow.set_tracking_uri(uri)
    scope = resolve_scope(client, args, uri)
    runs = fetch_runs(scope)
    out = Path(args.out or Path("reports") / (args.experiment or args.parent_run))
    report = write_report(client, scope, uri, runs, out)
    parent = scope.parent_run_id or single_parent(runs, rs.classify(runs))
    print(f"report written to {report}")
    if parent is not None:
        client.log_artifacts(parent, str(out), artifact_path="report")
        print(f"and logged as artifacts report/ of the sweep's parent run {parent}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ablate-report``)."""
    args = parse_args(argv)
    run_cli(lambda: build(args))


if __name__ == "__main__":
    main()

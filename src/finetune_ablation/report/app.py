"""``ablate-report``: compare the runs of a study with error bars, from any MLflow store.

    ablate-report --experiment val_beats_train --out reports/val_beats_train
    ablate-report --parent-run RUN_ID --out reports/sweep      # one Hydra multirun (its child runs)

Reads the runs with ``mlflow.search_runs`` (so it works on a remote tracking server too), leaves out
failed, pruned and running runs (and says how many), merges copies into distinct runs, groups the runs
into independent replicate blocks, and writes Markdown, CSV and PNG into ``--out``; a sweep's parent run
gets the same files as artifacts under ``report/``. What counts as evidence lives in ``design``, the
statistics over blocks in ``blocked`` and ``stats``, the wording in ``text``, the figures in ``plots``
(modules of this package) (docs/report.md explains every rule)."""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd

from .. import chance
from .. import record as rec
from ..descriptions import report_description
from ..errors import UserError, run_cli
from ..paths import CONF_DIR
from ..reaper import reap_once
from ..record import (
    CURVE_METRICS,
    GAP_COMPONENTS,
    GAP_PREFIX,
    GAP_TOTAL,
    MLFLOW_PARENT_RUN_TAG,
    MLFLOW_RUN_NAME_TAG,
    REUSED_TAG,
    VAL_ACCURACY,
)
from ..record import STUDY_METRICS as METRICS
from ..runstore import default_uri, get_run, open_store
from . import blocked, plots, text
from . import design as rd
from . import stats as rs


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
    parser.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="Markdown and CSV only, no PNG (about 0.7 s less per report: for scripts that build many)",
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
        for tag in (MLFLOW_PARENT_RUN_TAG, f"`{REUSED_TAG}`")
    ]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["run_id", "status"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("run_id").reset_index(drop=True)


def single_parent(runs: pd.DataFrame, kinds: pd.Series) -> str | None:
    """With --experiment: the sweep's parent when every job of the experiment belongs to one sweep."""
    jobs = runs[~kinds.isin(["parent", "reproduction"])]
    column = f"tags.{MLFLOW_PARENT_RUN_TAG}"
    if column not in jobs or jobs.empty or jobs[column].isna().any() or jobs[column].nunique() != 1:
        return None
    return str(jobs[column].iloc[0])


def config_groups() -> list[str]:
    """Config-group names a Hydra override can choose (``augment=strong``): the folders of conf/."""
    return sorted({p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"experiment"})


# ---------------------------------------------------------------------------------------------------
# Building the report


@dataclass
class Study:
    """The finished runs and everything computed from them: per run, per distinct run, per block."""

    runs: pd.DataFrame
    factors: list[rs.Factor]
    values: pd.DataFrame  # final metrics + majority rate + validation images, one row per run
    layout: blocked.Layout  # each run's distinct run, independent block and cell
    blocks: rd.Blocks
    means: pd.DataFrame  # block x column: each block's mean of every column of ``values``
    levels: dict[str, blocked.Levels]  # per factor: the block means of each level

    @classmethod
    def of(cls, finished: pd.DataFrame) -> Study:
        values = rd.with_majority(rs.final_metrics(finished, METRICS), finished)
        layout, blocks = rd.study_layout(finished)
        factors = rs.find_factors(finished, config_groups())
        levels = {f.name: blocked.levels_of(values, f, layout) for f in factors}
        return cls(finished, factors, values, layout, blocks, blocked.block_table(values, layout), levels)

    @property
    def units(self) -> pd.Series:
        return self.layout.units

    def distinct(self) -> pd.DataFrame:
        return rd.per_unit(self.values, self.units)

    def at_chance(self) -> bool | None:
        return rd.at_chance(self.means)

    @functools.cached_property
    def runs_at_chance(self) -> pd.Series:
        v = self.values
        return pd.Series(
            [chance.at_chance(a, n, m) for a, n, m in zip(v[VAL_ACCURACY], v["val_count"], v["majority"], strict=True)],
            index=v.index,
            dtype=object,
        )

    def level_chance(self, factor: rs.Factor) -> dict[str, bool | None]:
        return {level: rd.at_chance(means) for level, means in self.levels[factor.name].means.items()}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {name: blocked.factor_table(levels, list(METRICS)) for name, levels in self.levels.items()}

    def effects(self) -> dict[str, pd.DataFrame]:
        return {name: blocked.effects_table(levels, list(METRICS)) for name, levels in self.levels.items()}

    def gap_summary(self) -> tuple[pd.DataFrame, pd.Series]:
        """Ranked components (named without ``gap/``) over blocks, and the total, with verdicts."""
        means = self.means[[GAP_TOTAL, *(f"{GAP_PREFIX}{c}" for c in GAP_COMPONENTS)]]
        means.columns = [c[len(GAP_PREFIX) :] for c in means.columns]
        ranking = blocked.gap_ranking(means, list(GAP_COMPONENTS))
        total = pd.Series(blocked.total_row(means["total"]))
        if self.at_chance():
            ranking["verdict"] = text.AT_CHANCE_VERDICT
            total["verdict"] = text.AT_CHANCE_VERDICT
        return ranking, total


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
    name = row.get(f"tags.{MLFLOW_RUN_NAME_TAG}")
    return f"{name} ({row['run_id'][:8]})" if isinstance(name, str) else str(row["run_id"])


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_section(client: mlflow.MlflowClient, finished: pd.DataFrame, out: Path, figures: bool = True) -> list[str]:
    picked = rs.best_and_worst(finished)
    if picked is None:
        return ["## Learning curves", "", "No finished run logged val_accuracy.", ""]
    rows = {
        role: finished[finished["run_id"] == rid].iloc[0] for role, rid in zip(("best", "worst"), picked, strict=True)
    }
    if figures:
        titles = {role: f"{role}: {_run_label(row)}" for role, row in rows.items()}
        curves = {titles[r]: metric_curves(client, row["run_id"]) for r, row in rows.items()}
        _save(
            plots.best_worst_curves(curves, {titles[r]: _boundary(row) for r, row in rows.items()}),
            out / "learning_curves.png",
        )
    lines = ["## Learning curves of the best and the worst run", ""]
    for role, row in rows.items():
        acc = row.get(f"metrics.{VAL_ACCURACY}")
        name = row.get(f"tags.{MLFLOW_RUN_NAME_TAG}")
        named = f" ({name})" if isinstance(name, str) else ""
        lines.append(f"- {role}: run `{row['run_id']}`{named}, final val_accuracy {100 * acc:.1f}%")
    return [*lines, "", "![learning curves](learning_curves.png)" if figures else "", ""]


def runs_table(study: Study, at_chance: pd.Series) -> pd.DataFrame:
    """The raw rows the statistics come from, for anyone who wants to redo them."""
    finished = study.runs
    frame = pd.DataFrame({"run_id": finished["run_id"], "run_name": finished.get(f"tags.{MLFLOW_RUN_NAME_TAG}")})
    for key in rs.REPLICATE_KEYS:
        frame[key] = rs.param_values(finished, key)
    for factor in study.factors:
        frame[factor.name] = factor.levels
    frame["distinct_run"] = study.units
    frame["block"] = study.blocks.ids.map(study.blocks.labels)
    frame[rec.WEIGHTS_DIGEST_TAG] = rd.weights_hashes(finished)
    frame["at_chance"] = at_chance
    return pd.concat([frame, study.values], axis=1)


def first_lines(
    scope: Scope,
    uri: str,
    kinds: pd.Series,
    study: Study,
    identities: dict[str, rd.Identity],
    chance_levels: dict[str, dict[str, bool | None]],
    spread: dict[str, float],
) -> list[str]:
    """What a reader must know before any number: what counts, the design found (factors, replicate keys,
    independent blocks, what an interval is over and how wide it is), runs at chance."""
    lines = text.header_lines(scope.title, uri, kinds)
    configs = int(study.layout.cells.nunique())
    lines += text.design_found_lines(study.factors, configs, study.blocks, rd.replicate_design(study.runs))
    lines += text.precision_lines(study.blocks.count, spread)
    lines += text.copies_lines(
        rd.merges(study.runs, study.units),
        [name for name, identity in identities.items() if identity.changes_nothing],
    )
    at_chance = study.runs_at_chance
    names = [_run_label(study.runs.loc[i]) for i in at_chance.index[at_chance.eq(True)]]
    levels = [f"`{name}={v}`" for name, levels in chance_levels.items() for v, c in levels.items() if c]
    lines += text.chance_lines(study.at_chance(), names, len(study.runs), levels)
    return lines + text.method_lines()


def write_report(
    client: mlflow.MlflowClient, scope: Scope, uri: str, runs: pd.DataFrame, out: Path, figures: bool = True
) -> Path:
    kinds = rs.classify(runs)
    finished = runs[kinds == "finished"]
    if finished.empty:
        raise UserError(f"no finished runs to compare in {scope.title} ({text.counts_line(kinds)[2:]})")
    out.mkdir(parents=True, exist_ok=True)
    study = Study.of(finished)
    tables, effects = study.tables(), study.effects()
    ranking, total = study.gap_summary()
    study_at_chance = study.at_chance()
    identities = {f.name: rd.factor_identity(finished, f) for f in study.factors}
    chance_levels = {f.name: study.level_chance(f) for f in study.factors}
    spread = {"total": total["sd"], **dict(zip(ranking["component"], ranking["sd"], strict=True))}

    lines = first_lines(scope, uri, kinds, study, identities, chance_levels, spread)
    has_gap = bool(ranking["blocks"].sum() > 0)
    if has_gap and figures:
        _save(plots.gap_bars(ranking, total, bool(study_at_chance)), out / "gap_decomposition.png")
    lines += text.gap_markdown(ranking, total, has_gap and figures, study_at_chance)
    lines += ["## Factors", ""]
    if tables:
        if figures:
            majority = float(study.distinct()["majority"].mean())
            _save(plots.main_effects(tables, chance_levels, majority), out / "main_effects.png")
            lines += ["![main effects](main_effects.png)", ""]
        for factor in study.factors:
            name = factor.name
            lines += text.factor_markdown(factor, tables[name], effects[name], identities[name], chance_levels[name])
    else:
        lines += ["No swept keys: every finished run has the same config (apart from seeds).", ""]
    lines += curves_section(client, finished, out, figures)

    for name, frames, columns in (
        ("factors.csv", tables, blocked.FACTOR_COLUMNS),
        ("effects.csv", effects, blocked.EFFECT_COLUMNS),
    ):
        found = [f for f in frames.values() if not f.empty]
        rows = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=columns)
        rows.to_csv(out / name, index=False)
    pd.concat([ranking, total.to_frame().T], ignore_index=True).to_csv(out / "gap_components.csv", index=False)
    runs_table(study, study.runs_at_chance).to_csv(out / "runs.csv", index=False)
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
    report = write_report(client, scope, uri, runs, out, args.figures)
    parent = scope.parent_run_id or single_parent(runs, rs.classify(runs))
    print(f"report written to {report}")
    if parent is not None:
        client.log_artifacts(parent, str(out), artifact_path="report")
        client.set_tag(parent, rec.DESCRIPTION_TAG, report_description(report.read_text(), parent))
        print(f"and logged as artifacts report/ of the sweep's parent run {parent}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ablate-report``)."""
    args = parse_args(argv)
    run_cli(lambda: build(args))


if __name__ == "__main__":
    main()

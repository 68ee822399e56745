"""Hydra multiruns as one MLflow parent run with a child run per job, whatever the launcher.

The parent is created in the launching process by ``MlflowSweepCallback`` (a Hydra callback) and
tagged with the sweep's absolute directory; each job finds it through MLflow by that tag, so the
grouping works across processes and machines that share the tracking store (``parent_run_id``,
FACTS). A job whose config hash already has a FINISHED run is skipped (resume)."""

from __future__ import annotations

import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from hydra.experimental.callback import Callback
from mlflow.entities import Run
from omegaconf import DictConfig

from . import console, tracking
from .errors import UserError

log = logging.getLogger("finetune_ablation")

ROLE_TAG = "sweep.role"
DIR_TAG = "sweep.dir"
REUSED_TAG = "sweep.last_reused_by"  # set on a FINISHED run that a later sweep skipped to
SUMMARY_METRICS = (
    "val_accuracy",
    "accuracy",
    "train_clean_accuracy",
    "gap/total",
    "gap/lag",
    "gap/batchnorm",
    "gap/dropout",
    "gap/augmentation",
    "gap/split",
)
# Set by the callback at the end of a multirun, read by ``cli.main`` for the exit code.
failed_jobs_in_last_sweep = 0


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def find_parent_run(client: mlflow.MlflowClient, experiment_id: str, sweep_dir: str) -> Run | None:
    """The parent run of the multirun writing into ``sweep_dir`` (None outside a grouped sweep)."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.`{DIR_TAG}` = {_quote(sweep_dir)}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def finished_run_with_hash(client: mlflow.MlflowClient, experiment_id: str, config_hash: str) -> Run | None:
    """A FINISHED, not pruned run of the same config: what a resumed sweep reuses instead of training."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = {_quote(config_hash)} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return next((r for r in found if r.data.tags.get("pruned") != "true"), None)


def sweep_dir_of(config: DictConfig) -> str:
    return str(Path(str(config.hydra.sweep.dir)).resolve())


def _overrides(run: Run) -> dict[str, str]:
    pairs = (token.split("=", 1) for token in shlex.split(run.data.tags.get("hydra.overrides", "")))
    return {key.lstrip("+~"): value for key, value in (p for p in pairs if len(p) == 2)}


def summarize(client: mlflow.MlflowClient, experiment_id: str, parent: Run) -> pd.DataFrame:
    """One row per job of the sweep: new children and FINISHED runs it reused, swept values, metrics."""
    parent_id = parent.info.run_id
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    reused = client.search_runs([experiment_id], filter_string=f"tags.`{REUSED_TAG}` = '{parent_id}'")
    rows: list[dict[str, Any]] = []
    for run, was_reused in [(r, False) for r in children] + [(r, True) for r in reused]:
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "reused": was_reused,
            "pruned": run.data.tags.get("pruned") == "true",
            "error": run.data.tags.get("error", ""),
        }
        # the Optuna hand-off differs per trial but is bookkeeping, not a swept value
        row.update({f"override.{k}": v for k, v in _overrides(run).items() if k != "optuna"})
        row.update({m: run.data.metrics.get(m) for m in SUMMARY_METRICS})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run_id", "status", "reused", "pruned", "error"] if not rows else None)
    constant = [c for c in frame.columns if c.startswith("override.") and frame[c].nunique(dropna=False) <= 1]
    return frame.drop(columns=constant) if len(frame) > 1 else frame


class MlflowSweepCallback(Callback):
    """Opens the parent run before the first job and closes it with ``sweep_summary.csv`` after the last."""

    def __init__(self) -> None:
        self.client: mlflow.MlflowClient | None = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            uri = tracking.resolve_uri(config.tracking)
            self.client = tracking.connect(uri)
            # created once, up front: parallel jobs racing to create it can collide (FACTS)
            self.experiment_id = tracking.ensure_experiment(self.client, uri, config.tracking.experiment)
        except UserError as exc:
            log.error("error: %s (the sweep's jobs will fail the same way)", exc)
            self.client = None
            return
        sweep_dir = sweep_dir_of(config)
        overrides = " ".join(config.hydra.overrides.task)
        parent = self.client.create_run(
            self.experiment_id,
            run_name=f"sweep {Path(sweep_dir).parent.name}/{Path(sweep_dir).name}",
            tags={
                ROLE_TAG: "parent",
                DIR_TAG: sweep_dir,
                "sweep.command": shlex.join(["ablate", *sys.argv[1:]])[:5000],
                "hydra.overrides": overrides[:5000],
                "hydra.sweeper": str(config.hydra.sweeper.get("_target_", "")),
                "hydra.launcher": str(config.hydra.launcher.get("_target_", "")),
            },
        )
        self.parent_id = parent.info.run_id
        log.info("MLflow parent run %s groups this sweep (%s)", self.parent_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global failed_jobs_in_last_sweep
        if self.client is None or self.parent_id is None:
            return
        parent = self.client.get_run(self.parent_id)
        frame = summarize(self.client, self.experiment_id, parent)
        failed = int((frame["status"] != "FINISHED").sum()) if len(frame) else 0
        failed_jobs_in_last_sweep = failed
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sweep_summary.csv"
            frame.to_csv(path, index=False)
            self.client.log_artifact(self.parent_id, str(path))
        counts = {
            "sweep.jobs": len(frame),
            "sweep.failed": failed,
            "sweep.reused": int(frame["reused"].sum()) if len(frame) else 0,
            "sweep.pruned": int(frame["pruned"].sum()) if len(frame) else 0,
        }
        for key, value in counts.items():
            self.client.set_tag(self.parent_id, key, str(value))
        finished = frame[(frame["status"] == "FINISHED") & frame["val_accuracy"].notna()] if len(frame) else frame
        if len(finished):
            best = finished.loc[finished["val_accuracy"].idxmax()]
            self.client.set_tag(self.parent_id, "sweep.best_run_id", best["run_id"])
            self.client.log_metric(self.parent_id, "best_val_accuracy", float(best["val_accuracy"]))
        self.client.set_terminated(self.parent_id, "FINISHED")
        summary = ", ".join(f"{k.split('.')[1]}={v}" for k, v in counts.items())
        log.info("sweep done (MLflow parent run %s): %s", self.parent_id, summary)
        console.print_where_to_look(tracking.resolve_uri(config.tracking), self.experiment_id, self.parent_id, "sweep")
        if failed:
            log.error("error: %d of %d jobs failed: see their FAILED runs' error tag in MLflow", failed, len(frame))

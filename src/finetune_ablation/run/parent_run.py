"""Hydra multiruns as one MLflow parent run with a child run per job, whatever the launcher.

The parent is created in the launching process by ``MlflowSweepCallback`` (a Hydra callback) and
tagged with the sweep's absolute directory; each job finds it through MLflow by that tag, so the
grouping works across processes and machines that share the tracking store (``parent_run_id``,
docs/stack-facts.md). A job identical to a FINISHED run is skipped (resume.py says when and why)."""

from __future__ import annotations

import logging
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from hydra.experimental.callback import Callback
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf

from .. import console, descriptions, liveness, reaper, run_names, tracking
from .. import record as rec
from ..config import COMPUTING, role_of
from ..errors import UserError

log = logging.getLogger("finetune_ablation")

_UNQUOTABLE = re.compile(r"""['"\\]""")  # characters no MLflow filter string can quote


def tag_filter(key: str, value: str) -> tuple[str, bool]:
    """An MLflow filter clause selecting runs whose tag ``key`` equals ``value``, and whether the runs it
    returns must still be compared exactly.

    MLflow's filter strips the quotes around a value and unescapes nothing inside (``\\'`` and ``''``
    match nothing): a value without ``'`` goes in single quotes, one without ``"`` in double quotes, and
    one holding both is matched with LIKE, every quote and backslash a one-character wildcard, then
    compared exactly (tests/test_sweeps.py tries each case on a real store)."""
    if "'" not in value:
        return f"tags.`{key}` = '{value}'", False
    if '"' not in value:
        return f'tags.`{key}` = "{value}"', False
    return f"tags.`{key}` LIKE '{_UNQUOTABLE.sub('_', value)}'", True


def find_parent_run(client: mlflow.MlflowClient, experiment_id: str, sweep_dir: str) -> Run | None:
    """The parent run of the multirun writing into ``sweep_dir`` (None outside a grouped sweep)."""
    clause, recheck = tag_filter(rec.SWEEP_DIR_TAG, sweep_dir)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{rec.ROLE_TAG}` = '{rec.PARENT_ROLE}' and {clause}",
        order_by=["attributes.start_time DESC"],
        max_results=1000 if recheck else 1,
    )
    return next((r for r in found if r.data.tags.get(rec.SWEEP_DIR_TAG) == sweep_dir), None)


def sweep_dir_of(config: DictConfig) -> str:
    return str(Path(str(config.hydra.sweep.dir)).resolve())


def summarize(client: mlflow.MlflowClient, experiment_id: str, parent: Run) -> pd.DataFrame:
    """One row per job of the sweep: new children and FINISHED runs it reused, swept values, metrics."""
    parent_id = parent.info.run_id
    children = client.search_runs([experiment_id], filter_string=f"tags.{rec.MLFLOW_PARENT_RUN_TAG} = '{parent_id}'")
    reused = client.search_runs([experiment_id], filter_string=f"tags.`{rec.REUSED_TAG}` = '{parent_id}'")
    rows: list[dict[str, Any]] = []
    for run, was_reused in [(r, False) for r in children] + [(r, True) for r in reused]:
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "reused": was_reused,
            "pruned": run.data.tags.get(rec.PRUNED_TAG) == rec.TRUE,
            "error": run.data.tags.get(rec.ERROR_TAG, ""),
        }
        # swept values only: the Optuna hand-off differs per trial but is bookkeeping (config.Role)
        overrides = rec.override_values(run.data.tags.get(rec.HYDRA_OVERRIDES_TAG, ""))
        row.update({f"override.{k}": v for k, v in overrides.items() if role_of(k) in COMPUTING})
        row.update({m: run.data.metrics.get(m) for m in rec.STUDY_METRICS})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run_id", "status", "reused", "pruned", "error"] if not rows else None)
    constant = [c for c in frame.columns if c.startswith("override.") and frame[c].nunique(dropna=False) <= 1]
    return frame.drop(columns=constant) if len(frame) > 1 else frame


def log_jobs_datasets(client: mlflow.MlflowClient, experiment_id: str, parent_id: str) -> None:
    """The parent names the data of its jobs (their datasets, each split once), so the runs table names the
    data on a folded sweep's row too."""
    found = [
        run
        for tag in (rec.MLFLOW_PARENT_RUN_TAG, f"`{rec.REUSED_TAG}`")
        for run in client.search_runs([experiment_id], filter_string=f"tags.{tag} = '{parent_id}'")
    ]
    kept: dict[tuple[str, str, str], Any] = {}
    for run in found:
        for one in run.inputs.dataset_inputs if run.inputs else []:
            context = next((t.value for t in one.tags if t.key == rec.DATASET_CONTEXT_TAG), "")
            kept.setdefault((one.dataset.name, one.dataset.digest, context), one)
    if kept:
        client.log_inputs(parent_id, datasets=list(kept.values()))


def _exit(message: str, code: int) -> None:
    """End the multirun with one ``error:`` line. SystemExit is the one exception Hydra lets through
    a callback (it turns any other into a warning and exits 0), so the exit status is decided here,
    where the sweep's outcome is known."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def sweep_description(config: DictConfig, command: str, parent_id: str) -> str:
    """The parent's description: the study's question, its design (what it varies, its replicates) and the
    ``ablate-report`` command that answers it (descriptions.py)."""
    varied = run_names.sweep_definition(list(config.hydra.overrides.task), config.hydra.sweeper.get("params"))
    follows = OmegaConf.is_interpolation(config.data, "seed") and "${seed}" in str(
        OmegaConf.to_container(config.data)["seed"]
    )
    study = config.hydra.runtime.choices.get("experiment")
    design = descriptions.design_line(varied, follows)
    return descriptions.sweep_description(study, command, design, parent_id)


class MlflowSweepCallback(Callback):
    """Opens the parent run before the first job and closes it with ``sweep_summary.csv`` after the last.

    Exit status of ``ablate -m``: 2 when the tracking store cannot be reached (no job is launched), 1
    when a job failed (a FAILED child run, or an Optuna trial the sweeper counted as failed), else 0."""

    def __init__(self) -> None:
        self.client: mlflow.MlflowClient | None = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            uri = tracking.resolve_uri(config.tracking)
            self.client = tracking.connect(uri)
            # created once, up front: parallel jobs racing to create it can collide (docs/stack-facts.md)
            self.experiment_id = tracking.ensure_experiment(self.client, uri, config.tracking.experiment)
        except UserError as exc:
            _exit(f"{exc} (no job was launched)", 2)
        assert self.client is not None and self.experiment_id is not None
        reaper.reap_once(self.client, uri)  # runs left RUNNING by killed processes become KILLED
        sweep_dir = sweep_dir_of(config)
        command = shlex.join(["ablate", *sys.argv[1:]])
        parent = self.client.create_run(
            self.experiment_id,
            run_name=run_names.parent_run_name(config),
            tags={
                rec.ROLE_TAG: rec.PARENT_ROLE,
                rec.SWEEP_DIR_TAG: sweep_dir,
                rec.SWEEP_COMMAND_TAG: command[: rec.MAX_TAG_LENGTH],
                rec.HYDRA_OVERRIDES_TAG: rec.format_overrides(list(config.hydra.overrides.task)),
                rec.HYDRA_SWEEPER_TAG: str(config.hydra.sweeper.get("_target_", "")),
                rec.HYDRA_LAUNCHER_TAG: str(config.hydra.launcher.get("_target_", "")),
                **liveness.process_tags(),
            },
        )
        self.parent_id = parent.info.run_id
        self.client.set_tag(self.parent_id, rec.DESCRIPTION_TAG, sweep_description(config, command, self.parent_id))
        liveness.start(uri, self.parent_id, on_abort=lambda status: self.on_multirun_end(config, status=status))
        log.info("MLflow parent run %s groups this sweep (%s)", self.parent_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, status: str = "FINISHED", **kwargs: Any) -> None:
        """Close the parent; ``status`` is KILLED or FAILED when liveness ends an aborted sweep."""
        if self.client is None or self.parent_id is None:
            return
        liveness.stop(self.parent_id)
        try:
            failed, jobs = self._close_parent(status)
        except Exception as exc:  # Hydra would turn it into a warning and exit 0
            if status != "FINISHED":
                raise  # aborting already: liveness records the parent's end
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            _exit(f"could not close the sweep's MLflow parent run {self.parent_id} ({reason})", 1)
        console.print_where_to_look(tracking.resolve_uri(config.tracking), self.experiment_id, self.parent_id, "sweep")
        if failed and status == "FINISHED":
            _exit(f"{failed} of {jobs} jobs failed: see their FAILED runs' error tag in MLflow", 1)

    def _close_parent(self, status: str) -> tuple[int, int]:
        """Summary, counts and best run on the parent, then ``status``; returns (failed jobs, jobs)."""
        assert self.client is not None and self.parent_id is not None and self.experiment_id is not None
        parent = self.client.get_run(self.parent_id)
        frame = summarize(self.client, self.experiment_id, parent)
        failed = int((frame["status"] != "FINISHED").sum()) if len(frame) else 0
        # an Optuna trial can fail before its job opens a run (the sweeper tags how many did)
        failed = max(failed, int(parent.data.tags.get(rec.SWEEPER_FAILED_TAG, "0")))
        jobs = max(len(frame), int(parent.data.tags.get(rec.SWEEPER_LAUNCHED_TAG, "0")))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / rec.SWEEP_SUMMARY_CSV
            frame.to_csv(path, index=False)
            self.client.log_artifact(self.parent_id, str(path))
        counts = {
            "jobs": jobs,
            "failed": failed,
            "reused": int(frame["reused"].sum()) if len(frame) else 0,
            "pruned": int(frame["pruned"].sum()) if len(frame) else 0,
        }
        for name, value in counts.items():
            self.client.set_tag(self.parent_id, rec.SWEEP_COUNT_TAGS[name], str(value))
        log_jobs_datasets(self.client, self.experiment_id, self.parent_id)
        finished = frame[(frame["status"] == "FINISHED") & frame["val_accuracy"].notna()] if len(frame) else frame
        if len(finished):
            best = finished.loc[finished["val_accuracy"].idxmax()]
            self.client.set_tag(self.parent_id, rec.BEST_RUN_TAG, best["run_id"])
            self.client.log_metric(self.parent_id, rec.BEST_VAL_ACCURACY, float(best["val_accuracy"]))
        self.client.set_terminated(self.parent_id, status)
        summary = ", ".join(f"{k}={v}" for k, v in counts.items())
        ended = "done" if status == "FINISHED" else f"ended {status}"
        log.info("sweep %s (MLflow parent run %s): %s", ended, self.parent_id, summary)
        return failed, jobs

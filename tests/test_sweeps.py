"""Hydra multiruns in a subprocess: one MLflow parent per sweep, a child per job, resume, failures,
the joblib launcher, and every named study composing."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune_ablation.paths import EXPERIMENTS_DIR

from .conftest import FAST, run_ablate, runs

pytestmark = pytest.mark.slow

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=1"]


def _sweep(tmp_path: Path, image_dir: Path, *grid: str, name: str = "sweep"):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_ablate(
        "-m",
        *QUICK,
        f"data.dir={image_dir}",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp_path / name}",
        *grid,
        cwd=tmp_path,
    )
    return uri, result


def _out(result) -> str:
    return result.stdout + result.stderr


def _parents(uri: str):
    return [r for r in runs(uri) if r.data.tags.get("sweep.role") == "parent"]


def _children(uri: str, parent_id: str):
    return [r for r in runs(uri) if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _summary(uri: str, parent_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="sweep_summary.csv", tracking_uri=uri)
    return pd.read_csv(path)


def _check_grouping(uri: str, expected_jobs: int) -> str:
    (parent,) = _parents(uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.jobs"] == str(expected_jobs)
    assert parent.data.tags["sweep.command"].startswith("ablate -m")
    children = _children(uri, parent.info.run_id)
    assert len(children) == expected_jobs
    assert all(c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["model.dropout"], c.data.params["augment.flip"]) for c in children}
    assert combos == {("0.0", "None"), ("0.0", "horizontal"), ("0.5", "None"), ("0.5", "horizontal")}
    best = max(children, key=lambda c: c.data.metrics["val_accuracy"])
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["val_accuracy"]
    summary = _summary(uri, parent.info.run_id)
    assert len(summary) == expected_jobs
    assert {"override.model.dropout", "override.augment", "val_accuracy", "gap/total"} <= set(summary.columns)
    return parent.info.run_id


GRID = ["model.dropout=0,0.5", "augment=none,standard"]


def test_multirun_groups_jobs_and_resumes_without_retraining(tmp_path, image_dir):
    uri, result = _sweep(tmp_path, image_dir, *GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    first_parent = _check_grouping(uri, 4)

    # the same command again: every job is skipped, no new child run, no training
    _, again = _sweep(tmp_path, image_dir, *GRID, name="sweep2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _out(again).count("skipped: this config already FINISHED") == 4
    assert "Epoch" not in again.stdout
    parents = _parents(uri)
    assert len(parents) == 2
    second_parent = next(p for p in parents if p.info.run_id != first_parent)
    assert _children(uri, second_parent.info.run_id) == []
    assert second_parent.data.tags["sweep.reused"] == "4"
    assert _summary(uri, second_parent.info.run_id)["reused"].all()

    # one new value in the grid: only that job trains
    _, grown = _sweep(tmp_path, image_dir, "model.dropout=0,0.3", "augment=none", name="sweep3")
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert _out(grown).count("skipped: this config already FINISHED") == 1
    third = next(p for p in _parents(uri) if p.info.run_id not in (first_parent, second_parent.info.run_id))
    (new_child,) = _children(uri, third.info.run_id)
    assert new_child.data.params["model.dropout"] == "0.3"

    # resume=false forces a fresh run
    _, forced = _sweep(tmp_path, image_dir, "model.dropout=0.3", "augment=none", "resume=false", name="sweep4")
    assert forced.returncode == 0 and "skipped" not in _out(forced)


def test_a_failing_job_does_not_kill_the_sweep(tmp_path, image_dir):
    uri, result = _sweep(tmp_path, image_dir, "model.dropout=0,1.5", "augment=none")
    assert result.returncode == 1
    assert "error: model.dropout=1.5 is out of range" in _out(result)
    assert "1 of 2 jobs failed" in _out(result)
    (parent,) = _parents(uri)
    assert parent.data.tags["sweep.failed"] == "1"
    statuses = {c.data.params["model.dropout"]: c.info.status for c in _children(uri, parent.info.run_id)}
    assert statuses == {"0.0": "FINISHED", "1.5": "FAILED"}
    summary = _summary(uri, parent.info.run_id)
    assert "out of range" in summary.loc[summary["status"] == "FAILED", "error"].item()
    # the failed job is not "done": resuming the sweep retries it (and fails again), the good one is reused
    _, again = _sweep(tmp_path, image_dir, "model.dropout=0,1.5", "augment=none", name="sweep2")
    assert _out(again).count("skipped: this config already FINISHED") == 1


def test_joblib_launcher_with_two_workers_groups_the_same_way(tmp_path, image_dir):
    uri, result = _sweep(tmp_path, image_dir, *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_grouping(uri, 4)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_named_study_composes(tmp_path, name):
    result = run_ablate(f"experiment={name}", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"experiment: {name}" in result.stdout  # each study logs into its own MLflow experiment


@pytest.mark.parametrize("name", ["unfreeze_depth", "batchnorm", "regularization", "val_beats_train", "smoke"])
def test_studies_declare_their_sweep(tmp_path, name):
    result = run_ablate(f"experiment={name}", "--cfg", "hydra", "-p", "hydra.sweeper.params", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "," in result.stdout  # e.g. model.fine_tune_at: 0,60,100,120,140,154


def test_joblib_launcher_config_composes(tmp_path):
    result = run_ablate("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "--cfg", "hydra", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "JoblibLauncher" in result.stdout and "n_jobs: 2" in result.stdout

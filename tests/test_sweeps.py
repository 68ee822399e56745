"""Hydra multiruns in a subprocess: one MLflow parent per sweep, a child per job, resume, failures,
the joblib launcher, and every named study composing."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.entities import Run

from finetune_ablation import record as rec
from finetune_ablation.paths import EXPERIMENTS_DIR
from finetune_ablation.run import resume
from finetune_ablation.run.parent_run import find_parent_run, tag_filter
from hydra_plugins.finetune_ablation_optuna_sweeper.handoff import encode_value

from .helpers import FAST, LOG_IMPORTS, SKIPPED, artifact_text, imported, make_cfg, new_store, run_ablate, runs

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=1"]
# where a test checks resuming or failures, not what a job measured: no gap measurement to trace
UNMEASURED = "diagnostics=off"


def _sweep(tmp_path: Path, image_dir: Path, *grid: str, name: str = "sweep", **env_vars: str):
    uri = new_store(tmp_path)
    result = run_ablate(
        "-m",
        *QUICK,
        f"data.dir={image_dir}",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={encode_value(str(tmp_path / name))}",  # quoted: names may hold ' or "
        *grid,
        cwd=tmp_path,
        timeout=1500,  # a 4-job sweep on a loaded 2-core machine
        **env_vars,
    )
    return uri, result


def _out(result) -> str:
    return result.stdout + result.stderr


def _parents(uri: str):
    return [r for r in runs(uri) if r.data.tags.get("sweep.role") == "parent"]


def _children(uri: str, parent_id: str):
    return [r for r in runs(uri) if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _summary(uri: str, parent_id: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(artifact_text(uri, parent_id, "sweep_summary.csv")))


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
    assert summary["gap/total"].notna().all()  # measured jobs: their gap is in the summary
    return parent.info.run_id


GRID = ["model.dropout=0,0.5", "augment=none,standard"]


@pytest.mark.slow
def test_multirun_groups_jobs_and_resumes_without_retraining(tmp_path, image_dir):
    """Two joblib workers train the grid, measured; the basic launcher then resumes it: the launcher is
    Hydra's, not the job's config, so the same grid is the same four runs."""
    joblib = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    uri, result = _sweep(tmp_path, image_dir, *GRID, *joblib)
    assert result.returncode == 0, result.stderr[-3000:]
    first_parent = _check_grouping(uri, 4)

    # the same grid again: every job is skipped, no new child run, no training, not even TensorFlow imported
    _, again = _sweep(tmp_path, image_dir, *GRID, name="sweep2", **LOG_IMPORTS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _out(again).count(SKIPPED) == 4
    assert "Epoch" not in again.stdout
    assert imported(again, "mlflow") and not imported(again, "tensorflow")
    parents = _parents(uri)
    assert len(parents) == 2
    second_parent = next(p for p in parents if p.info.run_id != first_parent)
    assert _children(uri, second_parent.info.run_id) == []
    assert second_parent.data.tags["sweep.reused"] == "4"
    assert _summary(uri, second_parent.info.run_id)["reused"].all()

    # resume=false trains a config that is done again, as a new child of the new parent (a grid that is
    # partly done runs only its other jobs: test_a_failing_job_does_not_kill_the_sweep)
    _, forced = _sweep(tmp_path, image_dir, "model.dropout=0", "augment=none", "resume=false", name="sweep3")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "skipped" not in _out(forced)
    third = next(p for p in _parents(uri) if p.info.run_id not in (first_parent, second_parent.info.run_id))
    (forced_child,) = _children(uri, third.info.run_id)
    assert forced_child.info.status == "FINISHED"
    assert (forced_child.data.params["model.dropout"], forced_child.data.params["augment.flip"]) == ("0.0", "None")


# One job trains and FINISHES, one fails on its range; the sweep dir holds both quote characters
FAILING_GRID = ("model.dropout=0,1.5", "augment=none", UNMEASURED)
FAILING_SWEEP = 'it\'s "q"'


@dataclass
class _FailingSweep:
    """A sweep of ``FAILING_GRID`` on its own images and store, shared by the tests that resume it."""

    folder: Path
    images: Path
    uri: str
    result: subprocess.CompletedProcess
    parent: Run


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, image_dir) -> _FailingSweep:
    folder = tmp_path_factory.mktemp("failing-sweep")
    images = folder / "images"
    shutil.copytree(image_dir, images)
    uri, result = _sweep(folder, images, *FAILING_GRID, name=FAILING_SWEEP)
    (parent,) = _parents(uri)
    return _FailingSweep(folder, images, uri, result, parent)


def _parent_of(uri: str, sweep_dir: Path):
    (parent,) = (p for p in _parents(uri) if p.data.tags["sweep.dir"] == str(sweep_dir))
    return parent


@pytest.mark.slow
def test_a_failing_job_does_not_kill_the_sweep(failing_sweep):
    uri, result, parent = failing_sweep.uri, failing_sweep.result, failing_sweep.parent
    assert result.returncode == 1
    assert "error: model.dropout=1.5 is out of range" in _out(result)
    assert "error: 1 of 2 jobs failed" in result.stderr.splitlines()[-1]
    assert parent.data.tags["sweep.dir"] == str(failing_sweep.folder / FAILING_SWEEP)  # found despite the quotes
    assert parent.data.tags["sweep.failed"] == "1"
    statuses = {c.data.params["model.dropout"]: c.info.status for c in _children(uri, parent.info.run_id)}
    assert statuses == {"0.0": "FINISHED", "1.5": "FAILED"}
    summary = _summary(uri, parent.info.run_id)
    assert "out of range" in summary.loc[summary["status"] == "FAILED", "error"].item()
    assert summary["gap/total"].isna().all()  # diagnostics=off: nothing measured, nothing made up
    # the grid again with one value more: only what is not done runs. The failed job is not "done", so it
    # is retried (and fails again), the new value has no run yet (it fails on its range, before TensorFlow),
    # the good job is reused
    grown = ("model.dropout=0,1.5,2.5", "augment=none", UNMEASURED)
    _, again = _sweep(failing_sweep.folder, failing_sweep.images, *grown, name="grown", **LOG_IMPORTS)
    assert _out(again).count(SKIPPED) == 1
    second = _parent_of(uri, failing_sweep.folder / "grown")
    statuses = {c.data.params["model.dropout"]: c.info.status for c in _children(uri, second.info.run_id)}
    assert statuses == {"1.5": "FAILED", "2.5": "FAILED"}
    assert not imported(again, "tensorflow")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_named_study_composes(tmp_path, name):
    result = run_ablate(f"experiment={name}", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"experiment: {name}" in result.stdout  # each study logs into its own MLflow experiment


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unfreeze_depth", "batchnorm", "regularization", "val_beats_train", "smoke"])
def test_studies_declare_their_sweep(tmp_path, name):
    """What Hydra composes for ``hydra.sweeper.params`` is the grid the study's file declares."""
    result = run_ablate(f"experiment={name}", "--cfg", "hydra", "-p", "hydra.sweeper.params", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    declared = yaml.safe_load((EXPERIMENTS_DIR / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    composed = yaml.safe_load(result.stdout)
    assert composed == declared
    assert any("," in str(values) for values in composed.values())  # at least one factor has 2+ levels


@pytest.mark.slow
def test_joblib_launcher_config_composes(tmp_path):
    result = run_ablate("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "--cfg", "hydra", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "JoblibLauncher" in result.stdout and "n_jobs: 2" in result.stdout


QUOTED = ["/a/plain", "/a/it's", '/a/say "hi"', "/a/both'\"", "/a/b\\'q", "/a/%_x'\""]


def test_tag_filter_finds_exactly_the_tagged_run_in_a_real_store(tmp_path):
    """MLflow's filter unescapes nothing inside quotes: every sweep dir must still find its parent."""
    client = mlflow.MlflowClient(new_store(tmp_path))
    experiment = client.create_experiment("x")
    # look-alikes that a wildcard or a case-insensitive match would also find
    values = set(QUOTED)
    for value in QUOTED:
        values |= {value.upper(), value.replace("'", "x").replace('"', "y"), value + "z"}
    ids = {v: client.create_run(experiment, tags={"sweep.role": "parent", "sweep.dir": v}).info.run_id for v in values}
    for value in QUOTED:
        assert find_parent_run(client, experiment, value).info.run_id == ids[value], value
        clause, recheck = tag_filter("sweep.dir", value)
        found = {r.info.run_id for r in client.search_runs([experiment], filter_string=clause)}
        assert ids[value] in found
        assert recheck or found == {ids[value]}  # an exact clause returns only the run itself


def _trained(uri: str) -> set[str]:
    """The ids of the jobs' runs, finished or failed (a sweep's parent run has no config hash)."""
    return {r.info.run_id for r in runs(uri) if "config_hash" in r.data.tags}


@pytest.mark.slow
def test_resume_reuses_only_an_identical_run(failing_sweep):
    """Skipped when config (display settings aside), images, code and packages are the same; new images
    under the same data.dir are not reused. (A reproduction never stands in: test_reproduce.py, whose
    store holds a real one.)"""
    uri, images = failing_sweep.uri, failing_sweep.images
    done = [c for c in _children(uri, failing_sweep.parent.info.run_id) if c.info.status == "FINISHED"]
    (original,) = done  # model.dropout=0 of FAILING_GRID
    one = ["model.dropout=0", *FAILING_GRID[1:]]
    trained = _trained(uri)

    _, verbose = _sweep(failing_sweep.folder, images, *one, "train.verbose=1", name="verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert f"{SKIPPED}{original.info.run_id} FINISHED" in _out(verbose)
    assert _trained(uri) == trained

    # other images under the same path (another user's folder on a shared server looks the same): the
    # decision on the real run, in this process (a job that is not reused trains, as every other job does)
    cfg = make_cfg(images, uri, *QUICK[len(FAST) :], *one)
    client = mlflow.MlflowClient(uri)
    reused = resume.decide(client, original.info.experiment_id, cfg, resume.identity_tags(cfg)).reuse
    assert reused.info.run_id == original.info.run_id  # this process composes the sweep's config
    image = sorted((images / "alpaca").iterdir())[0]
    kept = image.read_bytes()
    try:
        shutil.copyfile(sorted((images / "not_alpaca").iterdir())[0], image)
        decision = resume.decide(client, original.info.experiment_id, cfg, resume.identity_tags(cfg))
        assert decision.reuse is None
        expected = f"re-running: a FINISHED run of this config exists ({original.info.run_id}) but the images"
        assert decision.reason.startswith(expected), decision.reason
        assert resume.data_fingerprint(cfg) != original.data.tags["data.fingerprint"]
    finally:
        image.write_bytes(kept)  # the shared sweep's images, as its other test resumes them


@pytest.mark.slow
def test_resume_says_when_code_or_packages_changed(tmp_path, image_dir):
    """The decision on a real store, for a run made by other code or other package versions."""
    uri = new_store(tmp_path)
    cfg = make_cfg(image_dir, uri, *QUICK[len(FAST) :])
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("x")
    tags = resume.identity_tags(cfg)
    fingerprint = resume.data_fingerprint(cfg)

    def finished(**changed: str) -> str:
        run = client.create_run(experiment, tags={**tags, "data.fingerprint": fingerprint, **changed})
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    old_code = finished(**{"code.sha256": "0" * 64, rec.GIT_COMMIT_TAG: "a" * 40})
    decision = resume.decide(client, experiment, cfg, tags)
    assert decision.reuse is None
    assert decision.reason == (
        f"re-running: a FINISHED run of this config exists ({old_code}) but the code changed "
        f"(commit aaaaaaaaaaaa->{tags[rec.GIT_COMMIT_TAG][:12]})"
    )
    old_keras = finished(**{"version.keras": "2.0.0"})
    decision = resume.decide(client, experiment, cfg, tags)
    assert decision.reuse is None
    assert f"({old_keras}) but package versions changed (keras 2.0.0->{tags['version.keras']})" in decision.reason
    running = client.create_run(experiment, tags={**tags, "data.fingerprint": fingerprint}).info.run_id
    assert resume.decide(client, experiment, cfg, tags).reuse is None  # RUNNING is not done
    client.set_terminated(running, "FINISHED")
    assert resume.decide(client, experiment, cfg, tags).reuse.info.run_id == running
    client.set_tag(running, "reproduced_from", old_code)
    assert resume.decide(client, experiment, cfg, tags).reuse is None  # a reproduction never stands in

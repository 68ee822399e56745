"""The engines users scale out to, run for real on 127.0.0.1 (docs/scaling-out.md has the recipes):
an MLflow tracking server with proxied artifacts, PostgreSQL as Optuna's storage and MLflow's backend
store, and Hydra's Ray launcher on a local Ray cluster. The servers are started and stopped by the
fixtures (tests/servers.py); each test runs the real ``ablate`` commands in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from finetune_ablation import record as rec
from finetune_ablation import tracking

from . import servers
from .helpers import (
    FAST,
    THREAD_SENSITIVE,
    history,
    new_store,
    require_module,
    run_ablate,
    runs,
    succeeded,
    sweep_parent_and_children,
)

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=1", "diagnostics=off"]


@pytest.fixture(autouse=True)
def _loopback_env(monkeypatch):
    """Subprocesses reach the servers directly, never through a proxy; Ray stays on 127.0.0.1."""
    for key, value in servers.RAY_LOOPBACK_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def mlflow_http(tmp_path) -> str:
    with servers.mlflow_server(tmp_path / "server") as uri:
        yield uri


@pytest.fixture
def ray_address() -> str:
    require_module("ray", "pip install -e '.[engines]'")
    require_module("hydra_plugins.hydra_ray_launcher", "pip install --no-deps hydra-ray-launcher==1.2.2")
    try:
        with servers.ray_cluster() as address:
            yield address
    except servers.ServerUnavailable as exc:
        pytest.skip(str(exc))


def _console(script: str, *args: str) -> subprocess.CompletedProcess:
    """One of the suite's console scripts, in a subprocess."""
    exe = Path(sys.executable).with_name(script)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1200)


def _sweep(tmp_path: Path, image_dir: Path, uri: str, *extra: str) -> str:
    return succeeded(
        run_ablate(
            "-m",
            *QUICK,
            f"data.dir={image_dir}",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *extra,
            cwd=tmp_path,
            timeout=1500,  # generous: a shared 2-core machine can be many times slower than CI's
        )
    )


@pytest.mark.slow
def test_a_joblib_sweep_logs_through_an_mlflow_server(tmp_path, image_dir, mlflow_http):
    """Two joblib workers log over HTTP; artifacts go through the server into its own folder; the report
    and the reproduction work against the server."""
    joblib = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    _sweep(tmp_path, image_dir, mlflow_http, f"{THREAD_SENSITIVE},150", *joblib)
    parent, children = sweep_parent_and_children(mlflow_http)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.jobs"] == "2"
    assert sorted(c.data.params["model.fine_tune_at"] for c in children) == ["0", "150"]
    assert all(c.info.status == "FINISHED" for c in children)
    # each job logged its share of the cores: the count the reproduction below must use again
    cores = len(os.sched_getaffinity(0))
    assert {c.data.params["threads"] for c in children} == {str(max(1, cores // 2))}
    granted = f"{cores} cores / 2 parallel jobs (joblib n_jobs)"
    assert {c.data.tags[rec.THREADS_GRANTED_TAG] for c in children} == {granted}
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in [parent, *children])  # proxied
    stored = tmp_path / "server" / "artifacts"  # the server's --artifacts-destination, read from disk
    (summary,) = stored.rglob(f"{parent.info.run_id}/artifacts/sweep_summary.csv")
    assert sorted(pd.read_csv(summary)["val_accuracy"]) == sorted(c.data.metrics["val_accuracy"] for c in children)

    report = tmp_path / "report"
    succeeded(
        _console(
            "ablate-report", "--parent-run", parent.info.run_id, "--tracking-uri", mlflow_http, "--out", str(report)
        )
    )
    assert len(pd.read_csv(report / "runs.csv")) == 2
    assert list(stored.rglob(f"{parent.info.run_id}/artifacts/report/report.md"))  # logged back to the parent

    # a job of a parallel sweep reproduces bit for bit in one process, which alone would use every core
    child = next(c for c in children if c.data.params["model.fine_tune_at"] == "0")
    assert "match" in succeeded(_console("ablate-reproduce", child.info.run_id, "--tracking-uri", mlflow_http))
    (again,) = (r for r in runs(mlflow_http) if r.data.tags.get("reproduced_from") == child.info.run_id)
    assert history(mlflow_http, again.info.run_id, "val_accuracy") == history(
        mlflow_http, child.info.run_id, "val_accuracy"
    )
    assert again.data.tags[rec.WEIGHTS_DIGEST_TAG] == child.data.tags[rec.WEIGHTS_DIGEST_TAG]
    assert again.data.params["threads"] == child.data.params["threads"]
    # the control: the same job with one thread more gives other bits here, so the match above needed the
    # logged count (a reproduction with this process's own count would not match)
    more = int(child.data.params["threads"]) + 1
    control = [*QUICK, f"data.dir={image_dir}", THREAD_SENSITIVE, f"threads={more}", "tracking.experiment=control"]
    succeeded(run_ablate(*control, f"tracking.uri={mlflow_http}", cwd=tmp_path, timeout=1500))
    (other,) = runs(mlflow_http, "control")
    assert other.data.tags[rec.WEIGHTS_DIGEST_TAG] != child.data.tags[rec.WEIGHTS_DIGEST_TAG]


@pytest.mark.slow
def test_postgres_holds_the_study_of_two_sweepers_and_the_mlflow_store(tmp_path, image_dir, postgres):
    """Two sweepers at once on one Optuna study in PostgreSQL, logging to an MLflow server whose backend
    store is PostgreSQL too: exactly n_trials trials done, none numbered twice, every trial a run."""
    postgres.create_database("optuna")
    postgres.create_database("mlflow")
    with servers.mlflow_server(tmp_path / "server", backend_store_uri=postgres.url("mlflow")) as uri:
        tracking.ensure_experiment(tracking.connect(uri), uri, "lr_search")  # up front: creation races
        exe = Path(sys.executable).with_name("ablate")
        args = [
            *("-m", "experiment=lr_search", *QUICK, f"data.dir={image_dir}", f"tracking.uri={uri}"),
            *(f"hydra.sweeper.storage={postgres.url('optuna')}", "hydra.sweeper.n_trials=3"),
            *("cache.phase1=true", f"cache.dir={tmp_path / 'cache'}"),  # one phase 1 per search
        ]
        logs = [tmp_path / f"worker{i}.log" for i in range(2)]
        procs = []
        for i, log in enumerate(logs):  # output to files: kept for a look when a worker hangs or fails
            with log.open("w") as out:
                command = [str(exe), *args, f"hydra.sweep.dir={tmp_path / f'worker{i}'}"]
                procs.append(subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT))
        try:
            for proc in procs:
                proc.wait(timeout=1500)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        for proc, log in zip(procs, logs, strict=True):
            assert proc.returncode == 0, log.read_text()[-4000:]
        trial_runs = [r for r in runs(uri, "lr_search") if "optuna.trial_number" in r.data.tags]

    (name,) = optuna.get_all_study_names(postgres.url("optuna"))
    study = optuna.load_study(study_name=name, storage=postgres.url("optuna"))
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 3
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert {r.data.tags["optuna.trial_number"] for r in trial_runs} == {str(t.number) for t in done}
    for i in range(2):  # both sweepers took part
        assert any(p.name.isdigit() for p in (tmp_path / f"worker{i}").iterdir())
    # MLflow's rows really are in PostgreSQL: count them with SQL, not through MLflow
    with postgres.connect("mlflow") as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'optuna.trial_number'"
        ).fetchone()
    assert count == 3


@pytest.mark.slow
def test_a_ray_sweep_groups_under_one_parent_and_shares_phase1(tmp_path, image_dir, ray_address):
    """Hydra's Ray launcher on a local Ray cluster: both jobs are children of one parent, ran in Ray
    workers, and the second one loaded phase 1 from the cache the first one wrote."""
    uri = new_store(tmp_path)
    output = _sweep(
        tmp_path,
        image_dir,
        uri,
        f"{THREAD_SENSITIVE},150",  # phase 2 only: both jobs share phase 1
        *("cache.phase1=true", f"cache.dir={tmp_path / 'cache'}"),
        *("hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_address}"),
        "+hydra.launcher.ray.init.object_store_memory=null",  # the launcher's CI default breaks connecting
    )
    assert "Ray Launcher is launching 2 jobs" in output
    parent, children = sweep_parent_and_children(uri)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert all("ray" in c.data.tags["mlflow.source.name"] for c in children)  # a Ray worker ran each job
    assert sorted(c.data.tags["phase1_cache"] for c in children) == ["hit", "miss"]
    assert len({c.data.tags["phase1_cache_key"] for c in children}) == 1
    first, second = (history(uri, c.info.run_id, "val_accuracy")[0] for c in children)
    assert first == second  # phase 1's last epoch: the very same numbers in both runs
    # the thread count is the CPU Ray granted each task (num_cpus=1), not the node's cores
    assert {c.data.params["threads"] for c in children} == {"1"}
    assert {c.data.tags[rec.THREADS_GRANTED_TAG] for c in children} == {"Ray num_cpus=1"}
    # the whole-base job reproduces bit for bit in one plain process (phase 1 trained again, 1 thread where
    # this process alone would use every core; the joblib test shows that the count changes its bits)
    deep = next(c for c in children if c.data.params["model.fine_tune_at"] == "0")
    assert "match" in succeeded(_console("ablate-reproduce", deep.info.run_id, "--tracking-uri", uri))
    (again,) = (r for r in runs(uri) if r.data.tags.get(rec.REPRODUCED_TAG) == deep.info.run_id)
    assert again.data.tags[rec.WEIGHTS_DIGEST_TAG] == deep.data.tags[rec.WEIGHTS_DIGEST_TAG]

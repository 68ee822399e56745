"""SLURM for real (docs/scaling-out.md, "SLURM"): a one-node cluster on 127.0.0.1 (tests/servers.py) runs the
jobs of ``ablate -m ... hydra/launcher=submitit_slurm`` as a user's cluster would, each job an ``sbatch``
array task in its own process.

- a study: every job a FINISHED child of one parent, each in its own SLURM job, the phase-1 cache shared
  (one miss, then a hit), the thread count what SLURM granted, and a job reproduced bit for bit;
- a job cancelled with ``scancel`` while it trains: its run is left RUNNING (its process was killed), the
  next ``ablate`` marks it KILLED, and the same command again trains exactly the missing job;
- an Optuna search whose trials are SLURM jobs, its study in PostgreSQL: exactly ``n_trials`` trials;
- the reaper seen from another node: a run whose SLURM job ended is KILLED at once, a running one not.

Kept cheap: 32-pixel images, one epoch per phase, no gap measurement; the cluster starts in ~2 s."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from finetune_ablation import liveness, reaper, tracking
from finetune_ablation import record as rec

from . import servers
from .helpers import (
    FAST,
    THREAD_SENSITIVE,
    history,
    new_store,
    run_ablate,
    runs,
    succeeded,
    sweep_parent_and_children,
)

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=1", "diagnostics=off"]
WAIT_S = 600  # generous: a shared 2-core machine can be many times slower than CI


@pytest.fixture(scope="module")
def slurm() -> servers.Slurm:
    try:
        servers.require_slurm()
    except servers.ServerUnavailable as exc:
        pytest.skip(str(exc))
    with servers.slurm_cluster(cpus=2) as cluster:
        yield cluster


def _on_slurm(cluster: servers.Slurm, tmp_path: Path, *extra: str) -> list[str]:
    """The arguments of a sweep on the cluster: a user's recipe, with the test's folders."""
    return [
        "-m",
        *QUICK,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.partition={cluster.partition}",
        "hydra.launcher.timeout_min=20",
        "hydra.launcher.cpus_per_task=1",  # two jobs at once on the 2-CPU node, one thread each
        *extra,
    ]


def _ended_as(cluster: servers.Slurm, jobs: list[str] | set[str], state: str) -> bool:
    """Whether SLURM itself (squeue) says every one of ``jobs`` ended in ``state``. A job's result reaches
    the launcher a moment before its SLURM job ends, so this waits for the end first."""
    deadline = time.monotonic() + 60
    while True:
        states = dict(cluster.jobs())
        if all(states.get(job) not in servers.SLURM_LIVE_STATES for job in jobs) or time.monotonic() > deadline:
            return all(states.get(job) == state for job in jobs)
        time.sleep(0.5)


@pytest.mark.slow
def test_a_study_on_slurm_groups_its_jobs_shares_phase1_and_reproduces(tmp_path, image_dir, slurm):
    uri = new_store(tmp_path)
    args = _on_slurm(
        slurm,
        tmp_path,
        f"data.dir={image_dir}",
        f"tracking.uri={uri}",
        f"{THREAD_SENSITIVE},150",  # phase 2 only: both jobs share phase 1
        *("cache.phase1=true", f"cache.dir={tmp_path / 'cache'}"),
    )
    started = time.monotonic()
    output = succeeded(run_ablate(*args, cwd=tmp_path, timeout=WAIT_S, **slurm.env))
    print(f"study of 2 SLURM jobs: {time.monotonic() - started:.1f} s")
    assert "Submitit 'slurm' sweep output dir" in output

    parent, children = sweep_parent_and_children(uri, latest=True)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.jobs"] == "2"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # each job ran in its own SLURM job, which SLURM itself (squeue) says COMPLETED
    jobs = [c.data.tags[rec.SLURM_JOB_TAG] for c in children]
    assert len(set(jobs)) == 2
    assert _ended_as(slurm, jobs, "COMPLETED")
    assert {c.data.tags[rec.SLURM_CLUSTER_TAG] for c in children} == {"ablate-test"}
    # the thread count is what SLURM granted (--cpus-per-task=1), not the node's 2 cores
    assert {c.data.params["threads"] for c in children} == {"1"}
    assert {c.data.tags[rec.THREADS_GRANTED_TAG] for c in children} == {"SLURM_CPUS_PER_TASK=1"}
    # one phase 1 for both: trained once (miss), loaded by the other (hit), the same numbers
    assert sorted(c.data.tags[rec.PHASE1_CACHE_TAG] for c in children) == ["hit", "miss"]
    assert len({c.data.tags[rec.PHASE1_CACHE_KEY_TAG] for c in children}) == 1
    first, second = (history(uri, c.info.run_id, "val_accuracy")[0] for c in children)
    assert first == second

    # the whole-base job reproduces bit for bit in one plain process (phase 1 trained again, with the job's
    # one thread where this process alone would use every core: tests/test_engines.py shows that the count
    # changes this job's bits)
    deep = next(c for c in children if c.data.params["model.fine_tune_at"] == "0")
    exe = Path(sys.executable).with_name("ablate-reproduce")
    again = subprocess.run(
        [str(exe), deep.info.run_id, "--tracking-uri", uri], capture_output=True, text=True, timeout=WAIT_S
    )
    assert again.returncode == 0 and "match" in again.stdout, again.stdout[-2000:] + again.stderr[-3000:]
    (copy,) = (r for r in runs(uri) if r.data.tags.get(rec.REPRODUCED_TAG) == deep.info.run_id)
    assert copy.data.params["threads"] == "1" and copy.data.metrics[rec.REPRODUCE_DIFF_METRIC] == 0.0
    assert copy.data.tags[rec.WEIGHTS_DIGEST_TAG] == deep.data.tags[rec.WEIGHTS_DIGEST_TAG]


def _wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert proc.poll() is None, f"the sweep ended before the awaited state:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the store"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_job_cancelled_with_scancel_is_reaped_and_the_relaunch_trains_only_it(tmp_path, image_dir, slurm):
    uri = new_store(tmp_path)
    tracking.connect(uri)  # this test's polling must not race the sweep in creating the store
    args = _on_slurm(slurm, tmp_path, f"data.dir={image_dir}", f"tracking.uri={uri}", "seed=1,2")
    exe = Path(sys.executable).with_name("ablate")
    log = tmp_path / "sweep.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **slurm.env}
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:

        def doomed() -> list:  # seed=2's run, open and tagged with its SLURM job
            return [
                r
                for r in runs(uri)
                if r.data.params.get("seed") == "2" and r.info.status == "RUNNING" and rec.SLURM_JOB_TAG in r.data.tags
            ]

        _wait_for(lambda: bool(doomed()), proc, log)
        (victim,) = doomed()
        job = victim.data.tags[rec.SLURM_JOB_TAG]
        cancel = slurm.run("scancel", job)  # as a user does: SIGTERM, then SIGKILL after KillWait
        assert cancel.returncode == 0, cancel.stderr
        proc.wait(timeout=WAIT_S)  # submitit learns of the cancel (the stand-in sacct) and the sweep ends
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"sweep with one job cancelled: {time.monotonic() - started:.1f} s")
    # a job of the sweep did not finish: one line says so and what to do, no traceback
    said = log.read_text()
    assert proc.returncode == 1 and "Traceback" not in said, said[-4000:]
    assert f"error: SLURM job {job} (task: 0) ended CANCELLED without a result" in said
    first_parent, _ = sweep_parent_and_children(uri, latest=True)
    assert (first_parent.info.status, first_parent.data.tags["sweep.failed"]) == ("FAILED", "1")
    assert _ended_as(slurm, [job], "CANCELLED")
    # MLflow never learns of it: the run stays RUNNING while its process is gone
    assert mlflow_status(uri, victim.info.run_id) == "RUNNING"
    assert {r.data.params.get("seed"): r.info.status for r in runs(uri) if "seed" in r.data.params}["1"] == "FINISHED"

    started = time.monotonic()
    output = succeeded(run_ablate(*args, cwd=tmp_path, timeout=WAIT_S, **slurm.env))  # the same command again
    print(f"relaunch: {time.monotonic() - started:.1f} s")
    reaped = next(r for r in runs(uri) if r.info.run_id == victim.info.run_id)
    assert reaped.info.status == "KILLED"
    assert reaped.data.tags[rec.REAPED_TAG] == f"process {victim.data.tags[rec.PID_TAG]} on " + (
        f"{victim.data.tags[rec.HOST_TAG]} is gone"
    )
    assert "was RUNNING but process" in output  # the relaunch says what it marked KILLED
    parent, children = sweep_parent_and_children(uri, latest=True)
    assert (parent.info.status, parent.data.tags["sweep.jobs"], parent.data.tags["sweep.reused"]) == (
        "FINISHED",
        "2",
        "1",
    )
    (trained,) = children  # exactly the missing job
    assert trained.data.params["seed"] == "2" and trained.info.status == "FINISHED"
    assert trained.data.tags[rec.SLURM_JOB_TAG] != job
    assert [r for r in runs(uri) if r.info.status == "RUNNING"] == []


def mlflow_status(uri: str, run_id: str) -> str:
    return next(r.info.status for r in runs(uri) if r.info.run_id == run_id)


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_as_slurm_jobs_with_an_exact_total(tmp_path, image_dir, slurm, postgres):
    postgres.create_database("optuna")
    storage = postgres.url("optuna")
    uri = new_store(tmp_path)
    args = _on_slurm(
        slurm,
        tmp_path,
        "experiment=lr_search",
        f"data.dir={image_dir}",
        f"tracking.uri={uri}",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=2",  # two trials at a time: 2, then exactly 1
        *("cache.phase1=true", f"cache.dir={tmp_path / 'cache'}"),
    )
    started = time.monotonic()
    succeeded(run_ablate(*args, cwd=tmp_path, timeout=WAIT_S, **slurm.env))
    print(f"Optuna search of 3 trials on SLURM: {time.monotonic() - started:.1f} s")

    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [t for t in study.trials if t.state in states]
    assert len(study.trials) == len(done) == 3
    trial_runs = [r for r in runs(uri, "lr_search") if rec.OPTUNA_TRIAL_TAG in r.data.tags]
    assert sorted(r.data.tags[rec.OPTUNA_TRIAL_TAG] for r in trial_runs) == ["0", "1", "2"]
    assert {t.user_attrs["mlflow_run_id"] for t in done} == {r.info.run_id for r in trial_runs}
    jobs = {r.data.tags[rec.SLURM_JOB_TAG] for r in trial_runs}
    assert len(jobs) == 3 and _ended_as(slurm, jobs, "COMPLETED")


def _sbatch(cluster: servers.Slurm, folder: Path, command: str) -> str:
    done = cluster.run("sbatch", "--parsable", "-o", str(folder / "%j.out"), "--wrap", command)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def test_the_reaper_asks_slurm_about_runs_on_another_node(slurm, tmp_path, monkeypatch):
    """A run whose process is on another node (a compute node, seen from the login node) is judged by its
    SLURM job: KILLED as soon as ``squeue`` says the job ended, left alone while it runs or when the
    run names another cluster (its heartbeat is fresh, so only SLURM's answer can mark it)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    running = _sbatch(slurm, tmp_path, "sleep 600")
    completed = _sbatch(slurm, tmp_path, "true")
    cancelled = _sbatch(slurm, tmp_path, "sleep 600")
    try:
        assert slurm.run("scancel", cancelled).returncode == 0
        assert _ended_as(slurm, [completed], "COMPLETED") and _ended_as(slurm, [cancelled], "CANCELLED")
        assert dict(slurm.jobs())[running] in ("PENDING", "RUNNING")

        uri = new_store(tmp_path)
        client = tracking.connect(uri)
        experiment = tracking.ensure_experiment(client, uri, "elsewhere")
        elsewhere = {**liveness.process_tags(), rec.HOST_TAG: "compute-node-7", rec.PID_TAG: "4242"}

        def run_of(job: str, cluster: str = "ablate-test") -> str:
            tags = {**elsewhere, rec.SLURM_JOB_TAG: job, rec.SLURM_CLUSTER_TAG: cluster}
            return client.create_run(experiment, tags=tags).info.run_id

        ids = {
            "running": run_of(running),
            "completed": run_of(completed),
            "cancelled": run_of(cancelled),
            "other cluster": run_of(completed, cluster="another-cluster"),
        }
        reaped = reaper.reap(client)
    finally:
        slurm.run("scancel", running)
    assert reaped == {
        ids["completed"]: f"SLURM job {completed} is COMPLETED (process 4242 on compute-node-7)",
        ids["cancelled"]: f"SLURM job {cancelled} is CANCELLED (process 4242 on compute-node-7)",
    }
    states = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert states == {"running": "RUNNING", "completed": "KILLED", "cancelled": "KILLED", "other cluster": "RUNNING"}

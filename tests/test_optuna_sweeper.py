"""The suite's Optuna sweeper (issue 5): the sweep grammar, the trial handoff, and real multiruns of
``ablate`` in subprocesses (Optuna storage and MLflow store in temp folders, generated images).

The grammar and handoff tests are fast; the multiruns train real models and are marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from finetune_ablation.paths import CONF_DIR
from hydra_plugins.finetune_ablation_optuna_sweeper import _results, _study
from hydra_plugins.finetune_ablation_optuna_sweeper._search_space import grid_values, parse_search_space
from hydra_plugins.finetune_ablation_optuna_sweeper.handoff import TrialHandoff, encode_value, open_storage

from .helpers import FAST, history, make_cfg, new_store, run_ablate, runs

# --- the grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ("interval(0.1, 0.5)", FloatDistribution(0.1, 0.5)),
        ("interval(0, 1)", FloatDistribution(0.0, 1.0)),  # Hydra makes interval ends floats
        ("tag(log, interval(1e-6, 1e-2))", FloatDistribution(1e-6, 1e-2, log=True)),
        ("int(interval(1, 10))", IntDistribution(1, 10)),
        ("tag(log, int(interval(1, 100)))", IntDistribution(1, 100, log=True)),
        ("choice(adam, sgd)", CategoricalDistribution(["adam", "sgd"])),
        ("choice(0.0, 0.2, 0.5)", CategoricalDistribution([0.0, 0.2, 0.5])),
        ("100,120,140", CategoricalDistribution([100, 120, 140])),
        ("range(1, 5)", IntDistribution(1, 4)),  # as Hydra's range: the stop is excluded
        ("range(0, 10, 3)", IntDistribution(0, 9, step=3)),
        ("range(5, 1, -1)", IntDistribution(2, 5)),
    ],
)
def test_grammar_maps_to_optuna_distributions(sweep, expected):
    space = parse_search_space({"x.y": sweep}, [])
    assert space.distributions == {"x.y": expected}
    assert space.spec == {"x.y": sweep} and space.fixed == []


def test_float_range_and_shuffle():
    space = parse_search_space({"a": "range(0.1, 0.5, 0.1)", "b": "shuffle(range(1, 4))"}, [])
    a, b = space.distributions["a"], space.distributions["b"]
    assert isinstance(a, FloatDistribution) and a.step == pytest.approx(0.1)
    assert (a.low, a.high) == pytest.approx((0.1, 0.4))
    assert isinstance(b, CategoricalDistribution) and sorted(b.choices) == [1, 2, 3]


def test_fixed_values_pass_through_and_the_command_line_wins():
    space = parse_search_space(
        {"train.fine_tune_lr": "tag(log, interval(1e-6, 1e-2))", "model.fine_tune_at": 100, "a.b": None},
        ["experiment=lr_search", "train.fine_tune_lr=0.001", "+extra.k=choice(x,y)", "augment=none,standard"],
    )
    assert space.fixed == ["model.fine_tune_at=100", "a.b=null", "experiment=lr_search", "train.fine_tune_lr=0.001"]
    assert space.distributions == {
        "extra.k": CategoricalDistribution(["x", "y"]),
        "augment": CategoricalDistribution(["none", "standard"]),
    }
    assert space.keys == {"extra.k": "+extra.k", "augment": "augment"}


def test_sampled_values_become_overrides_that_parse_back():
    space = parse_search_space({"s": "choice('a b', 'true', '1e-4', x)", "l": "choice([1,2],[3])"}, [])
    parser = OverridesParser.create()
    for s_value in space.distributions["s"].choices:
        for l_value in space.distributions["l"].choices:
            lines = space.overrides({"s": s_value, "l": l_value})
            parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(lines)}
            assert parsed["s"] == s_value and isinstance(parsed["s"], str)
            assert parsed["l"] == {"[1,2]": [1, 2], "[3]": [3]}[l_value]
    lr = 0.00034731363325341084
    (line,) = parse_search_space({"lr": "interval(1e-6, 1e-2)"}, []).overrides({"lr": lr})
    assert parser.parse_overrides([line])[0].value() == lr  # the exact float, not a rounded one


@pytest.mark.parametrize("value", ["it's", "a\\", "C:\\x\\y", "q\\'t", "sqlite:////tmp/a b/o.db", "", "null"])
def test_encoded_strings_round_trip(value):
    assert OverridesParser.create().parse_overrides([f"k={encode_value(value)}"])[0].value() == value


def test_grid_values_of_discrete_params_only():
    space = parse_search_space({"a": "choice(x, y)", "b": "range(0, 6, 2)", "c": "interval(0, 1)"}, [])
    assert grid_values("a", space.distributions["a"]) == ["x", "y"]
    assert grid_values("b", space.distributions["b"]) == [0, 2, 4]
    with pytest.raises(ValueError, match="c is continuous"):
        grid_values("c", space.distributions["c"])


# --- the handoff to the job ----------------------------------------------------------------------


HANDOFF = TrialHandoff(
    study_name="lr_search-0123abcd",
    storage="sqlite:////tmp/with space/it's/optuna.db",
    trial_number=7,
    pruner={"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "ratio": 0.5, "none": None},
)


def test_handoff_reaches_the_job_config(tracking_uri):
    """The job's composed ``cfg.optuna`` is the handoff, through the real schema."""
    cfg = make_cfg(None, tracking_uri, HANDOFF.to_override())
    assert TrialHandoff.from_config(cfg.optuna) == HANDOFF
    assert OmegaConf.to_container(cfg, resolve=True)["optuna"] == HANDOFF.as_dict()


def test_no_handoff_outside_a_sweep(tracking_uri):
    from finetune_ablation.run.optuna_trial import trial_callbacks, trial_tags

    cfg = make_cfg(None, tracking_uri)
    assert trial_tags(cfg) == {} and trial_callbacks(cfg) == []


def test_lr_search_selects_this_sweeper():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=lr_search"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("finetune_ablation_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert sweeper.params == {"train.fine_tune_lr": "tag(log, interval(1e-6, 1e-2))"}
    assert sweeper.direction.name == "maximize"
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.tracking.experiment == "lr_search"


def test_a_trial_numbered_past_the_total_is_surplus():
    """Two workers asking at the same instant: the trial numbered past the total must not run."""
    study = optuna.create_study()
    first, second, third = (study.ask() for _ in range(3))
    assert not _study.is_surplus(study, first, 2) and not _study.is_surplus(study, second, 2)
    assert _study.is_surplus(study, third, 2)
    study.tell(first, state=TrialState.FAIL)  # a failed trial frees its place for a later one
    assert not _study.is_surplus(study, third, 2)


def test_a_killed_workers_trials_go_stale_and_stop_counting(tmp_path):
    """A RUNNING trial whose heartbeat stopped (its sweeper was killed) is failed by the next sweeper."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1)  # grace 5 s
    study = optuna.create_study(storage=storage, study_name="s")
    with _study.Heartbeat(storage, study, interval=1) as beat:
        kept, dropped = _study.ask(study, {}), _study.ask(study, {})
        beat.add(kept)
        beat.add(dropped)
        beat.discard([dropped])  # as if its worker died: no more heartbeats for it
        deadline = time.monotonic() + 120  # the grace period is 5 s; a loaded machine may take longer
        while study.trials[1].state == TrialState.RUNNING and time.monotonic() < deadline:
            _study.fail_stale_trials(study)
            assert study.trials[0].state == TrialState.RUNNING  # its heartbeat goes on: never stale
            time.sleep(0.2)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL]


def test_relative_sqlite_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _study.absolute_storage_url("sqlite:///o.db") == f"sqlite:///{tmp_path / 'o.db'}"
    assert _study.absolute_storage_url("postgresql://u:pw@h/db") == "postgresql://u:pw@h/db"
    assert _study.printable_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    with pytest.raises(ValueError, match="does not exist"):
        _study.absolute_storage_url("sqlite:///missing/o.db")


def test_results_of_a_study(tmp_path):
    """optimization_results.yaml (the PyPI plugin's keys) and the plots, importances with 2+ params."""
    study = optuna.create_study(direction="maximize", study_name="s")
    for i in range(5):
        trial = study.ask({"lr": FloatDistribution(1e-5, 1e-1, log=True), "depth": IntDistribution(0, 150)})
        study.tell(trial, trial.params["depth"] / 150 - i / 100)
    study.tell(study.ask(), state=TrialState.FAIL)
    results = _results.summarize(study, 6, "sqlite:////x/optuna.db")
    assert results["trials"] == {"complete": 5, "fail": 1}
    assert results["best_value"] == study.best_value and results["best_params"] == study.best_params
    files = _results.write_outputs(study, results, tmp_path / "sweep")
    assert {f.name for f in files} == {
        "optimization_results.yaml",
        "optimization_history.png",
        "slice.png",
        "param_importances.png",
    }
    assert OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").best_value == study.best_value


# --- real multiruns ------------------------------------------------------------------------------

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=2", "diagnostics=off"]


def _args(tmp_path: Path, image_dir: Path, sweep: str, *extra: str, new_stores: bool = False) -> list[str]:
    """A lr_search sweep of ``ablate -m`` on the stores in ``tmp_path``; ``new_stores``: neither the MLflow
    store nor the Optuna database exists yet when it starts (the sweep creates them)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if new_stores else new_store(tmp_path)
    return [
        "-m",
        "experiment=lr_search",
        *QUICK,
        f"data.dir={image_dir}",
        f"tracking.uri={uri}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"hydra.sweep.dir={tmp_path / sweep}",
        # as in a user's search (the cache is on by default): the trials differ only in phase 2, so one
        # trains phase 1 and the others load it
        "cache.phase1=true",
        f"cache.dir={tmp_path / 'cache'}",
        *extra,
    ]


def _study_of(tmp_path: Path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _children(tmp_path: Path) -> list:
    return [r for r in runs(new_store(tmp_path), "lr_search") if "optuna.trial_number" in r.data.tags]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _check_trials_match_runs(trials: list, children: list, study_name: str) -> None:
    """Every trial is one MLflow child run, linked both ways, with the sampled LR."""
    by_id = {r.info.run_id: r for r in children}
    assert len(by_id) == len(trials)
    for trial in trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["optuna.study_name"] == study_name
        assert run.data.tags["mlflow.parentRunId"]
        assert float(run.data.params["train.fine_tune_lr"]) == trial.params["train.fine_tune_lr"]
        assert 1e-6 <= trial.params["train.fine_tune_lr"] <= 1e-2


@dataclass
class _Searched:
    """A 4-trial search (joblib, 2 at a time), then the same command with n_trials=6 and a pruner that
    prunes every trial at its first report."""

    root: Path
    uri: str
    first: list  # the study's trials after the first launch
    first_children: list
    first_parent: Any
    study: optuna.Study  # after the relaunch


@pytest.fixture(scope="module")
def searched(tmp_path_factory, image_dir) -> _Searched:
    root = tmp_path_factory.mktemp("search")
    first = run_ablate(
        *_args(root, image_dir, "sweep1", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2"),
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        cwd=root,
    )
    _ok(first)
    uri = new_store(root)
    first_trials = _study_of(root).trials
    first_children = _children(root)
    (first_parent,) = (r for r in runs(uri, "lr_search") if "sweep.role" in r.data.tags)
    second = run_ablate(
        *_args(root, image_dir, "sweep2", "hydra.sweeper.n_trials=6"),
        "hydra/sweeper/pruner=threshold",  # not part of the study's identity: the same study goes on
        "hydra.sweeper.pruner.lower=1.1",  # val_accuracy is never above 1: every trial is pruned
        cwd=root,
    )
    _ok(second)
    return _Searched(root, uri, first_trials, first_children, first_parent, _study_of(root))


@pytest.mark.slow
def test_a_search_leaves_its_trials_and_child_runs(searched):
    study = searched.study
    assert study.study_name.startswith("lr_search-")
    assert [t.state for t in searched.first] == [TrialState.COMPLETE] * 4
    assert len(searched.first_children) == 4
    _check_trials_match_runs(searched.first, searched.first_children, study.study_name)
    for trial in searched.first:  # val_accuracy of each fine-tune epoch (1, 2), from the job processes
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.value == trial.intermediate_values[2]
    # the phase-1 cache's lock, end to end: two joblib workers start two trials on one entry at once; whichever
    # took the lock first trained phase 1, the other waited and loaded it, as did the next two trials
    assert sorted(r.data.tags["phase1_cache"] for r in searched.first_children) == ["hit"] * 3 + ["miss"]


@pytest.mark.slow
def test_a_search_logs_its_results(searched):
    best = max(searched.first, key=lambda t: t.value)
    results = OmegaConf.load(searched.root / "sweep1" / "optimization_results.yaml")
    assert results.best_value == best.value and results.best_params == best.params
    assert results.trials == {"complete": 4}
    assert (searched.root / "sweep1" / "optimization_history.png").stat().st_size > 0
    parent = searched.first_parent
    assert parent.data.metrics["optuna.best_value"] == best.value
    assert float(parent.data.params["optuna.best.train.fine_tune_lr"]) == best.params["train.fine_tune_lr"]
    assert parent.data.tags["optuna.study_name"] == searched.study.study_name
    logged = {a.path for a in mlflow.MlflowClient(searched.uri).list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_results.yaml", "optuna/optimization_history.png", "optuna/slice.png"} <= logged


@pytest.mark.slow
def test_a_relaunch_runs_only_the_missing_trials(searched):
    study = searched.study
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert [t.state for t in study.trials[:4]] == [TrialState.COMPLETE] * 4  # untouched
    assert len(_children(searched.root)) == 6
    _check_trials_match_runs(study.trials, _children(searched.root), study.study_name)
    assert sorted(p.name for p in (searched.root / "sweep2").iterdir() if p.name.isdigit()) == ["0", "1"]


@pytest.mark.slow
def test_pruned_trials_stop_early(searched):
    """PRUNED in Optuna at the first fine-tune epoch; the MLflow run FINISHED there, tagged pruned."""
    for trial in searched.study.trials[4:]:
        assert trial.state == TrialState.PRUNED
        assert list(trial.intermediate_values) == [1] and trial.user_attrs["pruned_at_epoch"] == 1
        assert trial.value == trial.intermediate_values[1]
        run = mlflow.MlflowClient(searched.uri).get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["pruned"] == "true"
        # 1 + 2 epochs configured, 2 trained: the run holds the metrics it reached
        assert [step for step, _ in history(searched.uri, run.info.run_id, "val_accuracy")] == [0, 1]
        assert run.data.metrics["val_accuracy"] == trial.value


# A Hydra callback the two-worker test adds to each worker: every job waits (up to a deadline) until
# another trial is RUNNING beside its own, or the study has no room left for one, and records what it saw.
_BARRIER = """
import json, os, time
from pathlib import Path

import optuna
from hydra.experimental.callback import Callback


class Barrier(Callback):
    def on_job_start(self, config, **kwargs):
        handoff, out = config.optuna, Path(os.environ["BARRIER_DIR"])
        storage = optuna.storages.RDBStorage(handoff.storage, engine_kwargs={"connect_args": {"timeout": 60}})
        deadline = time.monotonic() + 300
        while True:
            trials = optuna.load_study(study_name=handoff.study_name, storage=storage).get_trials(deepcopy=False)
            running = [t.number for t in trials if t.state.name == "RUNNING"]
            live = sum(t.state.name in ("RUNNING", "COMPLETE", "PRUNED") for t in trials)
            if len(running) >= 2 or live >= int(os.environ["BARRIER_TOTAL"]) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        seen = {"pid": os.getpid(), "running": running}
        (out / f"{handoff.trial_number}.json").write_text(json.dumps(seen))
"""


@pytest.mark.slow
def test_two_concurrent_sweepers_stop_at_the_total(tmp_path, image_dir):
    """Two workers on one study, n_trials=4, started together on an MLflow store and an Optuna database
    that do not exist yet (both create them: the store lock and the storage retry, docs/stack-facts.md O3),
    forced to overlap (each job waits until a trial of the other worker runs beside it): 4 complete +
    pruned trials, none numbered twice, none run past the total, every trial's run under a parent."""
    (tmp_path / "barrier_cb").mkdir()
    (tmp_path / "barrier_cb" / "overlap_barrier.py").write_text(_BARRIER)
    (tmp_path / "seen").mkdir()
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "barrier_cb"), os.environ.get("PYTHONPATH", "")]),
        "BARRIER_DIR": str(tmp_path / "seen"),
        "BARRIER_TOTAL": "4",
    }
    exe = Path(sys.executable).with_name("ablate")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()
    procs = [
        subprocess.Popen(
            [
                str(exe),
                *_args(tmp_path, image_dir, f"worker{i}", "hydra.sweeper.n_trials=4", new_stores=True),
                "+hydra.callbacks.barrier._target_=overlap_barrier.Barrier",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=1500)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
    study = _study_of(tmp_path)
    done = study.get_trials(states=_study.DONE)
    assert len(done) == 4
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    others = [t for t in study.trials if t.state not in _study.DONE]
    assert all(t.user_attrs.get("surplus") for t in others)  # asked in the same instant, never run
    assert len(_children(tmp_path)) == 4
    assert {r.data.tags["optuna.trial_number"] for r in _children(tmp_path)} == {str(t.number) for t in done}
    found = runs(new_store(tmp_path), "lr_search")
    parents = {r.info.run_id for r in found if r.data.tags.get("sweep.role") == "parent"}
    assert len(parents) == 2  # one per worker, and no trial lost its parent:
    assert {r.data.tags.get("mlflow.parentRunId") for r in _children(tmp_path)} <= parents
    # the overlap really happened: each worker ran a trial while one of the other worker's was RUNNING
    seen = {int(p.stem): json.loads(p.read_text()) for p in (tmp_path / "seen").iterdir()}
    assert set(seen) == {t.number for t in done}
    worker_of = {number: s["pid"] for number, s in seen.items()}
    assert len(set(worker_of.values())) == 2
    for pid in set(worker_of.values()):
        assert any(
            s["pid"] == pid and any(worker_of.get(n) not in (None, pid) for n in s["running"]) for s in seen.values()
        ), seen


@pytest.mark.slow
def test_failing_trials_are_fail_and_the_sweep_goes_on_up_to_its_limit(tmp_path, image_dir):
    """Every sampled dropout is out of range: each trial FAILs (FAILED in MLflow); with
    max_failure_rate=1 the sweep goes on after a failure and stops after n_trials failures."""
    result = run_ablate(
        *_args(tmp_path, image_dir, "sweep", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1.0"),
        "model.dropout=interval(1.0, 1.5)",  # a search space on the command line works too
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "2 trials failed in this launch" in result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: 2 of 2 jobs failed")
    study = _study_of(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    children = _children(tmp_path)
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    assert all(1.0 <= float(r.data.params["model.dropout"]) <= 1.5 for r in children)

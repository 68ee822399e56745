"""Parallel first use of a store that does not exist yet: MLflow migrates a new sqlite database with no
lock of its own, so processes opening it together died in the migration (docs/stack-facts.md). The
suite creates and migrates it once, under ``<db>.lock``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_ablation import store

from .helpers import FAST, runs

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=1", "diagnostics=off"]


def _start_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once, then wait for all of them."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HYDRA_FULL_ERROR": "0"}
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outputs, strict=True)]


def test_four_processes_open_a_new_store_at_once(tmp_path):
    """The bare race: four processes connecting to a database that does not exist yet."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from finetune_ablation import tracking; tracking.connect({uri!r}); print('connected')"
    results = _start_all([[sys.executable, "-c", code] for _ in range(4)], tmp_path)
    for result in results:
        assert (result.returncode, result.stdout.strip().splitlines()[-1:]) == (0, ["connected"]), result.stdout
    assert store.lock_path(tmp_path / "mlflow.db").exists()  # the lock that serialised the creation


@pytest.mark.slow
def test_two_runs_start_together_on_a_new_store(tmp_path, image_dir):
    """Two ``ablate`` runs whose store does not exist yet: both create the experiment, open a run, log and
    end it, with no traceback. Each stops on a value out of range, right after its run is open: what a
    new store races on is creating the schema, the experiment and the first runs, not training (two
    Optuna sweepers that train, started together on a new store and a new study database:
    test_optuna_sweeper.py's ``test_two_concurrent_sweepers_stop_at_the_total``)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exe = str(Path(sys.executable).with_name("ablate"))
    common = [*QUICK, f"data.dir={image_dir}", f"tracking.uri={uri}", "tracking.experiment=fresh"]
    assert not (tmp_path / "mlflow.db").exists()

    results = _start_all([[exe, *common, f"seed={seed}", "model.dropout=1.5"] for seed in (1, 2)], tmp_path)

    for result in results:
        assert result.returncode == 2, result.stdout[-4000:]
        assert "Traceback" not in result.stdout, result.stdout[-4000:]
        assert result.stdout.strip().splitlines()[-1].startswith("error: model.dropout=1.5 is out of range")
    found = runs(uri, "fresh")
    assert [r.info.status for r in found] == ["FAILED", "FAILED"]
    assert {r.data.params["seed"] for r in found} == {"1", "2"}
    assert all("out of range" in r.data.tags["error"] for r in found)

"""``ablate`` as a user runs it: a real Hydra app in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import LOG_IMPORTS, imported, new_store, run_ablate, runs

pytestmark = pytest.mark.slow


def test_help_lists_config_groups(tmp_path):
    result = run_ablate("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("data:", "model:", "augment:", "train:", "tracking:", "diagnostics:", "experiment:"):
        assert group in result.stdout, group
    assert "demo" in result.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_ablate("--cfg", "job", "model.fine_tune_at=100", "augment=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fine_tune_at: 100" in result.stdout
    assert "flip: null" in result.stdout


def _one_error_line(result) -> str:
    """Bad input: exit 2 and exactly one ``error:`` line on stderr, no traceback (README's promise)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.dirr=x"], "Key 'dirr' not in 'DataConfig'"),
        (["data.image_size=big"], "Value 'big' of type 'str' could not be converted to Integer"),
        (["augment=wild"], "augment=wild is not an option of 'augment': use one of none, standard, strong"),
        (["model=nonexistent"], "model=nonexistent is not an option of 'model': use one of efficientnet_b0"),
        (["diagnostics.level=sometimes"], "Invalid value 'sometimes'"),
        (["model.dropout=interval(0.1"], "check the override's grammar"),
        (["-m", "model.dropout=choice(0.1,"], "check the override's grammar"),
        (["-m", "experiment=lr_search", "train.fine_tune_lr=interval(0,x)"], "mismatch type argument end"),
        (["-m", "experiment=lr_search", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0 is out of range"),
    ],
)
def test_a_config_hydra_cannot_compose_is_one_line_and_exit_2(tmp_path, overrides, message):
    uri = new_store(tmp_path)
    result = run_ablate(*overrides, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert message in _one_error_line(result)
    assert not list(tmp_path.glob("sweep/*/.hydra"))  # no job ran


def test_hydra_full_error_still_shows_hydras_own_message(tmp_path):
    exe = Path(sys.executable).with_name("ablate")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([str(exe), "augment=wild"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Available options in 'augment'" in result.stderr


@pytest.mark.parametrize("mode", [[], ["-m", "model.dropout=0,0.5"]])
def test_an_unknown_tracking_scheme_is_one_line_and_exit_2(tmp_path, mode):
    result = run_ablate(*mode, "tracking.uri=bogus://x", f"data.dir={tmp_path}", cwd=tmp_path, **LOG_IMPORTS)
    line = _one_error_line(result)
    assert "unsupported URI scheme 'bogus'" in line and "tracking.uri" in line
    # the line comes before TensorFlow's seconds of importing (MLflow: the log does list what was imported);
    # a multirun stops in its start callback, before any job: there it guards that this stays so
    assert imported(result, "mlflow") and not imported(result, "tensorflow")


def test_a_value_out_of_range_fails_its_run_before_tensorflow_loads(tmp_path):
    """A user's first command, on a store that does not exist yet: the one line is all it prints."""
    uri = f"sqlite:///{tmp_path / 'first.db'}"
    result = run_ablate("model.dropout=1.5", f"tracking.uri={uri}", f"data.dir={tmp_path}", cwd=tmp_path, **LOG_IMPORTS)
    line = _one_error_line(result)
    assert "model.dropout=1.5 is out of range" in line
    printed = [out for out in result.stderr.splitlines() if not out.startswith("import time:")]  # LOG_IMPORTS's
    assert (result.stdout, printed) == ("", [line])  # nothing of MLflow creating the store
    (run,) = runs(uri)
    assert run.info.status == "FAILED" and run.data.params["model.dropout"] == "1.5"
    assert imported(result, "mlflow") and not imported(result, "tensorflow")


def test_a_multirun_whose_store_cannot_be_reached_exits_2_before_any_job(tmp_path):
    with socket.socket() as probe:  # a free loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_ablate(
        "-m",
        "model.dropout=0,0.5",
        f"tracking.uri=http://127.0.0.1:{port}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    line = _one_error_line(result)
    assert f"cannot reach the MLflow tracking store http://127.0.0.1:{port}" in line
    assert "no job was launched" in line
    assert not list(tmp_path.glob("sweep/*/.hydra"))


@pytest.mark.parametrize(
    ("folder", "says"),
    [("none", "does not exist"), ("one_class", "has 1 class folder(s) ['alpaca']"), ("notes", "is not an image")],
)
def test_a_data_folder_of_the_wrong_shape_is_one_line_before_tensorflow_loads(tmp_path, folder, says):
    """Names alone show these (docs/your-data.md): the run is FAILED with its line within seconds."""
    (tmp_path / "one_class" / "alpaca").mkdir(parents=True)
    for name in ("alpaca", "not_alpaca"):
        (tmp_path / "notes" / name).mkdir(parents=True)
        (tmp_path / "notes" / name / "readme.txt").write_text("not an image")
    uri = new_store(tmp_path)
    result = run_ablate(f"tracking.uri={uri}", f"data.dir={tmp_path / folder}", cwd=tmp_path, **LOG_IMPORTS)
    assert says in _one_error_line(result)
    (run,) = runs(uri)
    assert run.info.status == "FAILED"
    assert imported(result, "mlflow") and not imported(result, "tensorflow")


def test_demo_experiment_composes_offline_settings(tmp_path):
    result = run_ablate("experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "synthetic: true" in result.stdout and "weights: demo" in result.stdout

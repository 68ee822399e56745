"""``ablate`` as a user runs it: a real Hydra app in a subprocess."""

from __future__ import annotations

import pytest

from .conftest import FAST, run_ablate, runs

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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.dirr=x", "Key 'dirr' not in 'DataConfig'"),
        ("data.image_size=big", "Value 'big' of type 'str' could not be converted to Integer"),
        ("augment=wild", "Could not find 'augment/wild'"),
        ("diagnostics.level=sometimes", "Invalid value 'sometimes'"),
    ],
)
def test_typed_schema_rejects_bad_keys_at_start(tmp_path, override, message):
    result = run_ablate("--cfg", "job", override, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    result = run_ablate(f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"data.dir={tmp_path}/none", cwd=tmp_path)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "does not exist" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_a_run_from_the_command_line(tmp_path, image_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_ablate(*FAST, f"data.dir={image_dir}", f"tracking.uri={uri}", "train.fine_tune_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hydra.overrides"].startswith("data.image_size=32")
    from mlflow import MlflowClient

    hydra_files = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, ".hydra")}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"} <= hydra_files


def test_demo_experiment_composes_offline_settings(tmp_path):
    result = run_ablate("experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "synthetic: true" in result.stdout and "weights: demo" in result.stdout

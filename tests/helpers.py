"""What the tests share besides fixtures: the fast settings, composing the real config, running the real
console script, and reading a store back. Fixtures live in ``conftest.py``; these are plain functions.

Everything is real: Keras trains, MLflow writes sqlite, Hydra composes ``conf/`` and ``experiments/``."""

from __future__ import annotations

import atexit
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from finetune_ablation import record as rec
from finetune_ablation.config import register_configs
from finetune_ablation.paths import CONF_DIR
from finetune_ablation.store import ensure_created

register_configs()  # the schema and the experiment group, for every test that composes conf/

# Small and fast, but the real pipeline: a random-init MobileNetV2 at its minimum input size.
FAST = [
    "data.image_size=32",
    "data.batch_size=8",
    "data.validation_split=0.2",  # 32 train / 8 val: whole batches of 8, so Keras traces each step once
    "model.weights=null",
    # phase 2 unfreezes block_16_project_BN, Conv_1 and Conv_1_bn: two trainable BatchNorm layers, and a third
    # less to trace than from layer 100; the tests of where the cut falls name their own depth
    "model.fine_tune_at=150",
    "model.calibrate_bn=true",  # a random base's features vanish without it (see model.calibrate_batchnorm)
    "train.initial_epochs=2",
    "train.fine_tune_epochs=2",
    "train.verbose=0",
    "cache.phase1=false",  # the phase-1 cache has its own tests (test_cache.py)
    "tracking.log_model=false",  # saving the model costs seconds; test_core_run's logged-model test turns it on
]

# A job whose bits depend on TensorFlow's thread count: the whole base fine-tuned, so the first convolutions'
# gradients (16x16 maps) are large enough for TensorFlow to split over its threads. With FAST's
# fine_tune_at=150 (1x1 maps only) 1 and 2 threads gave the same bits; with this, other weights (measured).
THREAD_SENSITIVE = "model.fine_tune_at=0"


def make_cfg(data_dir: Path | str | None, tracking_uri: str, *overrides: str) -> DictConfig:
    """Compose ``conf/`` exactly as ``ablate`` does, with the fast settings and ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        data = [f"data.dir={data_dir}"] if data_dir is not None else []
        return compose("config", overrides=[*FAST, *data, f"tracking.uri={tracking_uri}", *overrides])


def runs(tracking_uri: str, experiment: str = "finetune-ablation"):
    """All runs of an experiment, oldest first, as MLflow entities."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return list(found)


def history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def run_ablate(*args: str, cwd: Path, timeout: int = 600, **env_vars: str) -> subprocess.CompletedProcess:
    """The real console script, in a subprocess, as a user runs it (``env_vars`` added to its environment)."""
    exe = Path(sys.executable).with_name("ablate")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HYDRA_FULL_ERROR": "0", **env_vars}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# How resume's log line for a skipped job begins (run/resume.py), in the output of ``ablate -m``
SKIPPED = "skipped: identical run "

# Python's own import log (``python -X importtime``), written to stderr: what a process really imported
LOG_IMPORTS = {"PYTHONPROFILEIMPORTTIME": "1"}


def imported(result: subprocess.CompletedProcess, module: str) -> bool:
    """Whether a process run with ``LOG_IMPORTS`` imported ``module`` (its import log line names it)."""
    return any(line.split("|")[-1].strip() == module for line in result.stderr.splitlines() if "|" in line)


def artifact_text(tracking_uri: str, run_id: str, name: str) -> str:
    """The text of one artifact of a run (downloaded into a folder removed at once: MLflow's own default
    folder would stay behind in the system's temp directory)."""
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=name, tracking_uri=tracking_uri, dst_path=folder
        )
        return Path(local).read_text()


_template: Path | None = None


def new_store(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of a ready, empty MLflow sqlite store ``folder/name`` (kept if it exists already).

    It is a copy of one store per test process, created and migrated by the suite's own code
    (``store.ensure_created``): MLflow's migrations cost seconds per new store, a copy milliseconds.
    tests/test_fresh_store.py creates its stores from nothing, as a user's first run does."""
    global _template
    if _template is None:
        folder_of_template = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        atexit.register(shutil.rmtree, folder_of_template, ignore_errors=True)
        template = folder_of_template / "mlflow.db"
        ensure_created(f"sqlite:///{template}", template)
        _template = template
    db = Path(folder) / name
    if not db.exists():
        shutil.copyfile(_template, db)
    return f"sqlite:///{db}"


def keras_split(directory: Path | str, seed: int, validation_split: float, size: int = 32) -> tuple[list, list]:
    """The split users had: Keras's own loader (``image_dataset_from_directory``, ``subset="both"``), an
    implementation of the assignment independent of the suite's: (training paths, validation paths)."""
    import keras

    train, val = keras.utils.image_dataset_from_directory(
        str(directory),
        validation_split=validation_split,
        subset="both",
        seed=seed,
        batch_size=None,
        image_size=(size, size),
        verbose=False,
    )
    return train.file_paths, val.file_paths


def read_split(image_dir: Path, size: int, seed: int = 42, validation_split: float = 0.2):
    """Both splits as Keras splits the folder, read file by file: (images, labels) in the file order."""
    import keras

    classes = sorted(p.name for p in Path(image_dir).iterdir() if p.is_dir())

    def read(paths):
        images = [keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size))) for p in paths]
        labels = np.array([classes.index(Path(p).parent.name) for p in paths])
        return np.stack(images).astype(np.float32), labels

    return tuple(read(paths) for paths in keras_split(image_dir, seed, validation_split, size))


# ---------------------------------------------------------------------------------------------------
# Statistics written out by hand, for the tests of the run's and the report's intervals

# Student t quantiles (0.975) by degrees of freedom and the normal one, from printed tables
T_975 = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.182446305284263, 4: 2.7764451051977987}
Z_975 = 1.959963984540054
# The report's numbers are accuracies or differences of accuracies (|x| <= 1) combined from at most a few
# dozen doubles by sums, one square root and one quantile: each step adds a few ulp of 1. 4096 ulp leaves
# a wide margin on any IEEE-754 CPU and is still ten orders finer than one image of a validation split.
TOL = 4096 * math.ulp(1.0)


def wilson_by_hand(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of ``correct`` of ``n``, written out (Wilson 1927)."""
    p, z2 = correct / n, Z_975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


def require_module(module: str, install: str) -> None:
    """Skip the test, saying how to install it, unless ``module`` is importable."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {install} (.ci/run does)")


def succeeded(result: subprocess.CompletedProcess) -> str:
    """A console command's output, after asserting it exited 0 (its last lines are the failure message)."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def sweep_parent_and_children(uri: str, experiment: str = "finetune-ablation", latest: bool = False):
    """A sweep's parent run and its children; ``latest``: the last of several sweeps, else the only one."""
    every = runs(uri, experiment)
    parents = [r for r in every if r.data.tags.get(rec.ROLE_TAG) == rec.PARENT_ROLE]
    if not latest:
        assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[-1]
    return parent, [r for r in every if r.data.tags.get(rec.MLFLOW_PARENT_RUN_TAG) == parent.info.run_id]

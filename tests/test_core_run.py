"""One two-phase run, end to end: what lands in MLflow, determinism, BatchNorm drift (issue: core run)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from finetune_ablation import record as rec
from finetune_ablation.chance import wilson_interval
from finetune_ablation.cli import run_job

from .helpers import artifact_text, history, make_cfg, new_store, read_split, runs, wilson_by_hand
from .independent import IndependentCheck, independent_passes, train_with

LOG_MODEL = "tracking.log_model=true"  # FAST turns it off; the default run here is the one loaded back
EPOCHS = [0, 1, 2, 3]  # 2 + 2 epochs, numbered continuously across the phases


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_dir):
    """Runs shared by this module's tests: trained once each, read many times."""
    uri = new_store(tmp_path_factory.mktemp("store"))
    ids = {}
    for name, overrides in {
        "default": [LOG_MODEL],
        "repeat": [],
        "diagnostics_off": ["diagnostics=off"],
    }.items():
        result = run_job(make_cfg(image_dir, uri, f"tracking.run_name={name}", *overrides))
        assert result is not None and 0 <= result <= 1
        ids[name] = runs(uri)[-1].info.run_id
    return uri, ids


@pytest.fixture(scope="module")
def absent_effects(tmp_path_factory, image_dir):
    """A run without the effects (BatchNorm frozen in phase 2 too, no augmentation, no dropout), with the
    independent check (tests/independent.py) recomputing every condition of every epoch by hand: where
    the meter computes a condition once for two, the check computes both, as Keras does."""
    uri = new_store(tmp_path_factory.mktemp("absent"))
    cfg = make_cfg(image_dir, uri, "model.freeze_bn=true", "augment=none", "model.dropout=0", "diagnostics=full")
    check = IndependentCheck(*read_split(image_dir, 32), None, cfg.data.seed, cfg.data.batch_size)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run = train_with(monkeypatch, cfg, check)
    return uri, run, check


def _run(store, name):
    uri, ids = store
    return mlflow.MlflowClient(uri).get_run(ids[name])


@pytest.mark.slow
def test_run_finishes_with_whole_config_as_params(store):
    run = _run(store, "default")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.fine_tune_at"] == "150"
    assert params["model.dropout"] == "0.2"
    assert params["model.bn_training"] == "False"
    assert params["train.fine_tune_lr"] == "0.0001"
    assert params["diagnostics.level"] == "full"
    assert params["model.first_unfrozen_layer"] == "block_16_project_BN"  # Keras 3 MobileNetV2 layer 150
    assert params["data.class_names"] == "alpaca,not_alpaca"
    assert int(params["data.count.train.total"]) + int(params["data.count.val.total"]) == 40


@pytest.mark.slow
def test_per_epoch_metrics_of_both_phases_continue_steps(store):
    uri, ids = store
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        steps = [step for step, _ in history(uri, ids["default"], key)]
        assert steps == EPOCHS, key
    lrs = [value for _, value in history(uri, ids["default"], "learning_rate")]
    assert lrs[:2] == pytest.approx([1e-3, 1e-3]) and lrs[2:] == pytest.approx([1e-4, 1e-4])


@pytest.mark.slow
def test_phase_metrics_answer_the_freezing_questions(store):
    metrics = _run(store, "default").data.metrics
    assert metrics["phase1/trainable_params_base"] == 0
    assert metrics["phase1/trainable_params_head"] == 1281  # Dense(1) on 1280 pooled features
    assert metrics["phase2/trainable_params_base"] > 0
    assert metrics["phase1/base_is_model_layer"] == 1.0
    # Keras 3: a frozen base never moves BN statistics; an unfrozen BN called with training=False
    # still runs in training mode during fit() and moves them (docs/stack-facts.md K2). Asserted, so a
    # Keras change shows.
    assert metrics["phase1/bn_moving_stats_delta"] == 0.0
    assert metrics["phase2/bn_moving_stats_delta"] > 0.0
    # the run's tag says which behaviour it ran under (gap.probe, on tiny models): it agrees with this run's
    # own BatchNorm, called with training=False (model.bn_training=false) and unfrozen in phase 2
    tags = _run(store, "default").data.tags
    keeps = str(metrics["phase2/bn_moving_stats_delta"] == 0.0).lower()
    assert tags["answer.training_false_keeps_bn_frozen"] == keeps
    assert tags["answer.keras_probe"].startswith(f"Keras {keras.__version__}:")


@pytest.mark.slow
def test_frozen_batchnorm_keeps_its_statistics_while_fine_tuning(store, absent_effects):
    metrics = _run(store, "default").data.metrics
    frozen = absent_effects[1].data.metrics
    assert frozen["phase2/bn_moving_stats_delta"] == 0.0
    assert frozen["phase2/trainable_params_base"] < metrics["phase2/trainable_params_base"]


@pytest.mark.slow
def test_tags_identify_code_data_and_config(store):
    tags = _run(store, "default").data.tags
    for key in (rec.GIT_COMMIT_TAG, "git.dirty", "config_hash", "data.fingerprint", "model.weights_sha256"):
        assert tags[key], key
    for package in ("tensorflow", "keras", "mlflow", "hydra-core", "optuna"):
        assert tags[f"version.{package}"] != "not installed"
    assert tags["answer.same_base_object"].endswith("is base: True")
    assert tags["data.cross_split_duplicates"] == "0"


@pytest.mark.slow
def test_artifacts_are_logged(store):
    uri, ids = store
    client = mlflow.MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(ids["default"])}
    assert {
        "config.yaml",
        "history.csv",
        "learning_curves.png",
        "gap.png",
        "gap_summary.txt",
        "trainable_weights_phase1.txt",
        "trainable_weights_phase2.txt",
    } <= names
    frame = pd.read_csv(io.StringIO(artifact_text(uri, ids["default"], "history.csv")))
    assert frame["epoch"].tolist() == EPOCHS
    assert frame["phase"].tolist() == [1, 1, 2, 2]
    assert frame["val_accuracy"].iloc[-1] == _run(store, "default").data.metrics["val_accuracy"]


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(store):
    uri, ids = store
    client = mlflow.MlflowClient(uri)
    first, second = client.get_run(ids["default"]), client.get_run(ids["repeat"])
    assert first.data.tags["config_hash"] == second.data.tags["config_hash"]
    assert first.data.tags["model.weights_sha256"] == second.data.tags["model.weights_sha256"]
    for key in first.data.metrics:
        assert history(uri, ids["default"], key) == history(uri, ids["repeat"], key), key


@pytest.mark.slow
def test_measuring_the_gap_does_not_change_training(store):
    """Diagnostics save and restore everything they touch: bit-identical weights and Keras metrics."""
    uri, ids = store
    client = mlflow.MlflowClient(uri)
    full, off = client.get_run(ids["default"]), client.get_run(ids["diagnostics_off"])
    assert full.data.tags["model.weights_sha256"] == off.data.tags["model.weights_sha256"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history(uri, ids["default"], key) == history(uri, ids["diagnostics_off"], key), key
    assert "gap/total" not in off.data.metrics


@pytest.mark.slow
def test_logged_model_reproduces_the_last_epoch(store, image_dir, tmp_path):
    """The model logged with MLflow's Keras flavor, loaded back from runs:/<id>/model and run on both
    splits as Keras's own loader splits the folder, gives the last epoch's val and train_clean numbers,
    and so the ends of the decomposition: gap/split and gap/total (against Keras's training accuracy)."""
    uri, ids = store
    run = _run(store, "default")
    assert run.data.tags["model.uri"] == f"runs:/{ids['default']}/model"
    mlflow.set_tracking_uri(uri)
    model = mlflow.keras.load_model(run.data.tags["model.uri"], dst_path=str(tmp_path))
    assert type(model.get_layer("preprocess")) is keras.layers.Rescaling  # Keras's own: loads anywhere
    clean, val = independent_passes(model, *read_split(image_dir, 32))
    m = run.data.metrics
    clean.compare(m["train_clean_accuracy"], m["train_clean_loss"], "train_clean")
    val.compare(m["val_accuracy"], m["val_loss"], "val")
    (ca, cl, ctol, cflip, cn), (va, vl, vtol, vflip, vn) = clean.result(), val.result()
    assert abs(m["gap/split"] - (va - ca)) <= vflip / vn + cflip / cn
    assert abs(m["gap_loss/split"] - (vl - cl)) <= vtol + ctol  # a difference keeps both terms' errors
    assert abs(m["gap/total"] - (va - m["accuracy"])) <= vflip / vn
    assert abs(m["gap_loss/total"] - (vl - m["loss"])) <= vtol


# Run in a fresh Python that refuses to import the suite: what a user's notebook or server does with a run's model
_LOAD_ANYWHERE = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "finetune_ablation":
            raise ImportError(f"{name} must not be needed to load a logged model")

sys.meta_path.insert(0, Refuse())
import mlflow, numpy as np
uri, folder = sys.argv[1], sys.argv[2]
images = np.load(f"{folder}/images.npy")
model = mlflow.keras.load_model(uri, dst_path=f"{folder}/keras")
np.save(f"{folder}/keras.npy", model.predict(images, verbose=0))
served = mlflow.pyfunc.load_model(uri, dst_path=f"{folder}/pyfunc")
np.save(f"{folder}/pyfunc.npy", np.asarray(served.predict(images)))
print(sorted(m for m in sys.modules if m.startswith("finetune")))
"""


@pytest.mark.slow
def test_logged_model_loads_and_predicts_in_a_python_that_never_imported_the_suite(store, image_dir, tmp_path):
    """``mlflow.keras.load_model`` and ``mlflow.pyfunc.load_model(...).predict`` on the run's ``model.uri`` in a
    fresh process where importing finetune_ablation raises: the logits classify the validation images (read
    here with Keras's own loader) to the logged val_accuracy, and both flavors give the same logits."""
    uri, _ = store
    run = _run(store, "default")
    _, (images, labels) = read_split(image_dir, 32)
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_ANYWHERE, run.data.tags["model.uri"], str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # nothing of the suite was imported
    logits, served = np.load(tmp_path / "keras.npy"), np.load(tmp_path / "pyfunc.npy")
    assert logits.shape == served.shape == (len(labels), 1)
    assert np.array_equal(logits, served)
    # a logit within float32 rounding of the threshold may fall either way on another machine
    undecided = int(np.sum(np.abs(logits) <= 1e-5 * max(1.0, float(np.max(np.abs(logits))))))
    accuracy = float(np.mean((logits[:, 0] > 0) == labels))
    assert abs(accuracy - run.data.metrics["val_accuracy"]) <= undecided / len(labels) + 1e-7


@pytest.mark.slow
def test_chance_is_flagged_first_when_validation_cannot_beat_the_majority(store, image_dir):
    """8 validation images: the Wilson interval of any accuracy near 0.5 holds the majority rate."""
    uri, ids = store
    run = _run(store, "default")
    labels = read_split(image_dir, 32)[1][1]
    majority = max(np.mean(labels == 0), np.mean(labels == 1))
    assert run.data.metrics["val_majority_rate"] == pytest.approx(majority, abs=1e-12)
    assert run.data.tags["gap.at_chance"] == "true"
    assert artifact_text(uri, ids["default"], "gap_summary.txt").startswith("AT CHANCE: ")


def _colour_folder(root, per_class: int) -> None:
    """Red versus blue noisy squares, separable by mean colour; a random base's pooled features separate them only
    in part (measured: 0.70 of 40 validation images after phase 1)."""
    rng = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(50, 10, size=(32, 32, 3))
            pixels[..., channel] += 150
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")


@pytest.mark.slow
def test_a_clearly_learned_model_is_not_flagged(tmp_path, tracking_uri):
    _colour_folder(tmp_path / "colours", per_class=100)
    cfg = make_cfg(
        tmp_path / "colours",
        tracking_uri,
        "augment=none",  # features cached: phase 1 is cheap
        "train.base_lr=1e-2",
        "train.initial_epochs=4",
        "train.fine_tune_epochs=1",
        "model.freeze_bn=true",
        "model.fine_tune_at=100",  # measured: the random base ends phase 1 at 0.625; this phase 2 lifts it to 0.80
        "diagnostics=final",
    )
    assert run_job(cfg) is not None
    (run,) = runs(tracking_uri)
    n = int(run.data.params["data.count.val.total"])
    accuracy, majority = run.data.metrics["val_accuracy"], run.data.metrics["val_majority_rate"]
    low = wilson_interval(round(accuracy * n), n)[0]
    assert n == 40 and low > majority, (accuracy, majority)
    assert run.data.tags["gap.at_chance"] == "false"
    phase1, phase2 = artifact_text(tracking_uri, run.info.run_id, "gap_summary.txt").splitlines()[:2]
    assert phase2.startswith("phase 2, epoch 5 (step 4): ")  # no warning first, none on its line
    # phase 1's own check, by hand: its last epoch's interval reaches the majority rate, or not
    accuracy1 = history(tracking_uri, run.info.run_id, "val_accuracy")[3][1]
    phase1_at_chance = wilson_by_hand(round(accuracy1 * n), n)[0] <= majority
    assert phase1.startswith("phase 1, epoch 4 (step 3)" + (", AT CHANCE (" if phase1_at_chance else ": ")), phase1


@pytest.mark.slow
def test_gap_components_are_exactly_zero_where_the_effect_is_absent(absent_effects):
    """BatchNorm frozen in both phases, no augmentation, no dropout: the components are exactly 0 at every
    epoch, and every condition they are differences of equals the independent check's own pass (which
    runs the base in training mode and the dropout layer, as fit does, where the meter may reuse a pass)."""
    uri, run, check = absent_effects
    assert check.checked == [(1, 0), (1, 1), (2, 2), (2, 3)]
    for component in ("dropout", "augmentation", "batchnorm"):
        for prefix in ("gap/", "gap_loss/"):
            assert [v for _, v in history(uri, run.info.run_id, prefix + component)] == [0.0] * 4, component


@pytest.mark.slow
def test_gap_effects_present_when_switched_on(store):
    """With dropout, augmentation and unfrozen BN on, their components are not all zero."""
    uri, ids = store
    for component in ("dropout", "augmentation"):
        assert any(v != 0.0 for _, v in history(uri, ids["default"], f"gap_loss/{component}")), component
    assert any(v != 0.0 for _, v in history(uri, ids["default"], "gap_loss/batchnorm")[2:])


@pytest.mark.slow
def test_wilson_intervals_bracket_the_accuracies(store):
    metrics = _run(store, "default").data.metrics
    assert metrics["val_accuracy_ci_low"] <= metrics["val_accuracy"] <= metrics["val_accuracy_ci_high"]
    low, high = metrics["train_clean_accuracy_ci_low"], metrics["train_clean_accuracy_ci_high"]
    assert low <= metrics["train_clean_accuracy"] <= high
    assert high - low > 0.2  # 32 images: the interval is wide, and the suite says so


@pytest.mark.slow
def test_gap_summary_names_components_per_phase(store):
    uri, ids = store
    text = artifact_text(uri, ids["default"], "gap_summary.txt")
    assert text.startswith("AT CHANCE: ")  # 8 validation images (see the chance test)
    assert "\nphase 1, epoch 2 (step 1), AT CHANCE (val_accuracy " in text  # each phase's own check
    assert "\nphase 2, epoch 4 (step 3), AT CHANCE (val_accuracy " in text
    for component in ("lag", "batchnorm", "dropout", "augmentation", "split"):
        assert component in text


@pytest.mark.slow
def test_resolved_config_artifact_round_trips(store, image_dir):
    uri, ids = store
    logged = OmegaConf.create(artifact_text(uri, ids["default"], "config.yaml"))
    composed = make_cfg(image_dir, uri, "tracking.run_name=default", LOG_MODEL)
    expected = OmegaConf.to_container(composed, resolve=True)
    expected["threads"] = len(os.sched_getaffinity(0))  # threads: null logs the count used: this process's cores
    assert OmegaConf.to_container(logged) == expected


@pytest.mark.slow
def test_more_than_two_classes_train_a_softmax_head(tmp_path, tracking_uri):
    from finetune_ablation.demo_data import write_image_folder

    write_image_folder(tmp_path / "three", 32, per_class=12, seed=1, classes=("alpaca", "llama", "vicuna"))
    cfg = make_cfg(tmp_path / "three", tracking_uri, "train.initial_epochs=1", "train.fine_tune_epochs=1", LOG_MODEL)
    assert run_job(cfg) is not None
    (run,) = runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.class_names"] == "alpaca,llama,vicuna"
    assert run.data.metrics["phase1/trainable_params_head"] == 1280 * 3 + 3
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.keras.load_model(run.data.tags["model.uri"], dst_path=str(tmp_path))
    clean, val = independent_passes(model, *read_split(tmp_path / "three", 32))
    clean.compare(run.data.metrics["train_clean_accuracy"], run.data.metrics["train_clean_loss"], "train_clean")
    val.compare(run.data.metrics["val_accuracy"], run.data.metrics["val_loss"], "val")

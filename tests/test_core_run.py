"""One two-phase run, end to end: what lands in MLflow, determinism, BatchNorm drift (issue: core run)."""

from __future__ import annotations

import json
import math

import mlflow
import pandas as pd
import pytest

from finetune_ablation.cli import run_job

from .conftest import artifact_path, history, make_cfg, runs

pytestmark = pytest.mark.slow

EPOCHS = [0, 1, 2, 3]  # 2 + 2 epochs, numbered continuously across the phases


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_dir):
    """Runs shared by this module's tests: trained once each, read many times."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    ids = {}
    for name, overrides in {
        "default": [],
        "repeat": [],
        "diagnostics_off": ["diagnostics=off"],
        "frozen_bn_no_aug_no_dropout": ["model.freeze_bn=true", "augment=none", "model.dropout=0"],
    }.items():
        result = run_job(make_cfg(image_dir, uri, f"tracking.run_name={name}", *overrides))
        assert result is not None and 0 <= result <= 1
        ids[name] = runs(uri)[-1].info.run_id
    return uri, ids


def _run(store, name):
    uri, ids = store
    return mlflow.MlflowClient(uri).get_run(ids[name])


def test_run_finishes_with_whole_config_as_params(store):
    run = _run(store, "default")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.fine_tune_at"] == "100"
    assert params["model.dropout"] == "0.2"
    assert params["model.bn_training"] == "False"
    assert params["train.fine_tune_lr"] == "0.0001"
    assert params["diagnostics.level"] == "full"
    assert params["model.first_unfrozen_layer"] == "block_11_expand_relu"  # Keras 3 MobileNetV2 layer 100
    assert params["data.class_names"] == "alpaca,not_alpaca"
    assert int(params["data.count.train.total"]) + int(params["data.count.val.total"]) == 40


def test_per_epoch_metrics_of_both_phases_continue_steps(store):
    uri, ids = store
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        steps = [step for step, _ in history(uri, ids["default"], key)]
        assert steps == EPOCHS, key
    lrs = [value for _, value in history(uri, ids["default"], "learning_rate")]
    assert lrs[:2] == pytest.approx([1e-3, 1e-3]) and lrs[2:] == pytest.approx([1e-4, 1e-4])


def test_phase_metrics_answer_the_freezing_questions(store):
    metrics = _run(store, "default").data.metrics
    assert metrics["phase1/trainable_params_base"] == 0
    assert metrics["phase1/trainable_params_head"] == 1281  # Dense(1) on 1280 pooled features
    assert metrics["phase2/trainable_params_base"] > 0
    assert metrics["phase1/base_is_model_layer"] == 1.0
    # Keras 3: a frozen base never moves BN statistics; an unfrozen BN called with training=False
    # still runs in training mode during fit() and moves them (FACTS). Asserted, so a Keras change shows.
    assert metrics["phase1/bn_moving_stats_delta"] == 0.0
    assert metrics["phase2/bn_moving_stats_delta"] > 0.0
    frozen = _run(store, "frozen_bn_no_aug_no_dropout").data.metrics
    assert frozen["phase2/bn_moving_stats_delta"] == 0.0
    assert frozen["phase2/trainable_params_base"] < metrics["phase2/trainable_params_base"]


def test_tags_identify_code_data_and_config(store):
    tags = _run(store, "default").data.tags
    for key in ("git.commit", "git.dirty", "config_hash", "data.fingerprint", "model.weights_sha256"):
        assert tags[key], key
    for package in ("tensorflow", "keras", "mlflow", "hydra-core", "optuna"):
        assert tags[f"version.{package}"] != "not installed"
    assert tags["answer.same_base_object"].endswith("is base: True")
    assert tags["data.cross_split_duplicates"] == "0"


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
    path = artifact_path(uri, ids["default"], "history.csv")
    frame = pd.read_csv(path)
    assert frame["epoch"].tolist() == EPOCHS
    assert frame["phase"].tolist() == [1, 1, 2, 2]
    assert frame["val_accuracy"].iloc[-1] == _run(store, "default").data.metrics["val_accuracy"]


def test_same_config_and_seed_give_identical_metrics(store):
    uri, ids = store
    client = mlflow.MlflowClient(uri)
    first, second = client.get_run(ids["default"]), client.get_run(ids["repeat"])
    assert first.data.tags["config_hash"] == second.data.tags["config_hash"]
    assert first.data.tags["model.weights_sha256"] == second.data.tags["model.weights_sha256"]
    for key in first.data.metrics:
        assert history(uri, ids["default"], key) == history(uri, ids["repeat"], key), key


def test_measuring_the_gap_does_not_change_training(store):
    """Diagnostics save and restore everything they touch: bit-identical weights and Keras metrics."""
    uri, ids = store
    client = mlflow.MlflowClient(uri)
    full, off = client.get_run(ids["default"]), client.get_run(ids["diagnostics_off"])
    assert full.data.tags["model.weights_sha256"] == off.data.tags["model.weights_sha256"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history(uri, ids["default"], key) == history(uri, ids["diagnostics_off"], key), key
    assert "gap/total" not in off.data.metrics


def test_gap_components_sum_to_total_every_epoch(store):
    uri, ids = store
    for prefix in ("gap", "gap_loss"):
        total = dict(history(uri, ids["default"], f"{prefix}/total"))
        assert sorted(total) == EPOCHS
        parts = [
            dict(history(uri, ids["default"], f"{prefix}/{c}"))
            for c in ("lag", "batchnorm", "dropout", "augmentation", "split")
        ]
        for epoch in EPOCHS:
            assert math.isclose(sum(p[epoch] for p in parts), total[epoch], abs_tol=1e-9)


def test_gap_components_are_exactly_zero_where_the_effect_is_absent(store):
    uri, ids = store
    # phase 1: the base is frozen, so BatchNorm runs on moving statistics in training mode too
    assert [v for _, v in history(uri, ids["default"], "gap/batchnorm")][:2] == [0.0, 0.0]
    # dropout 0, augment=none, and freeze_bn=true (BN frozen in phase 2 as well)
    for component in ("dropout", "augmentation", "batchnorm"):
        values = [v for _, v in history(uri, ids["frozen_bn_no_aug_no_dropout"], f"gap/{component}")]
        assert values == [0.0] * 4, component
    assert [v for _, v in history(uri, ids["frozen_bn_no_aug_no_dropout"], "gap_loss/dropout")] == [0.0] * 4


def test_gap_effects_present_when_switched_on(store):
    """With dropout, augmentation and unfrozen BN on, their components are not all zero."""
    uri, ids = store
    for component in ("dropout", "augmentation"):
        assert any(v != 0.0 for _, v in history(uri, ids["default"], f"gap_loss/{component}")), component
    assert any(v != 0.0 for _, v in history(uri, ids["default"], "gap_loss/batchnorm")[2:])


def test_wilson_intervals_bracket_the_accuracies(store):
    metrics = _run(store, "default").data.metrics
    assert metrics["val_accuracy_ci_low"] <= metrics["val_accuracy"] <= metrics["val_accuracy_ci_high"]
    low, high = metrics["train_clean_accuracy_ci_low"], metrics["train_clean_accuracy_ci_high"]
    assert low <= metrics["train_clean_accuracy"] <= high
    assert high - low > 0.2  # 32 images: the interval is wide, and the suite says so


def test_gap_summary_names_components_per_phase(store):
    uri, ids = store
    path = artifact_path(uri, ids["default"], "gap_summary.txt")
    text = path.read_text()
    assert text.startswith("phase 1, epoch 1: ")
    assert "phase 2, epoch 3: " in text
    for component in ("lag", "batchnorm", "dropout", "augmentation", "split"):
        assert component in text


def test_resolved_config_artifact_round_trips(store):
    uri, ids = store
    path = artifact_path(uri, ids["default"], "config.yaml")
    from omegaconf import OmegaConf

    logged = OmegaConf.load(path)
    assert logged.model.fine_tune_at == 100
    assert json.dumps(OmegaConf.to_container(logged.train), sort_keys=True)


def test_more_than_two_classes_train_a_softmax_head(tmp_path, tracking_uri):
    from finetune_ablation.demo_data import write_image_folder

    write_image_folder(tmp_path / "three", 32, per_class=12, seed=1, classes=("alpaca", "llama", "vicuna"))
    cfg = make_cfg(tmp_path / "three", tracking_uri, "train.initial_epochs=1", "train.fine_tune_epochs=1")
    assert run_job(cfg) is not None
    (run,) = runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.class_names"] == "alpaca,llama,vicuna"
    assert run.data.metrics["phase1/trainable_params_head"] == 1280 * 3 + 3
    assert math.isclose(
        sum(run.data.metrics[f"gap/{c}"] for c in ("lag", "batchnorm", "dropout", "augmentation", "split")),
        run.data.metrics["gap/total"],
        abs_tol=1e-9,
    )

"""What the MLflow UI shows first (issue 36), read back through MLflow's client, never the UI: run names that
say what each run is, descriptions that carry the finding, the splits as MLflow datasets; and the built-in
preprocessing layers that let a logged model load without this package (the fresh-process load is in
test_core_run.py, on its logged model).

The end-to-end part is one real ``ablate -m experiment=smoke`` (shrunk to two quick jobs on the test images)
in a subprocess; every expected value is computed here from the sweep's own definition and the image folder
(Keras's split, hashed with hashlib), not by the code under test."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from finetune_ablation import record as rec
from finetune_ablation import run_names
from finetune_ablation.descriptions import report_description, run_description, study_question
from finetune_ablation.report import app as report_app
from finetune_ablation.run.model import PREPROCESSING_MODES, preprocessing_layer
from hydra_plugins.finetune_ablation_optuna_sweeper.handoff import encode_value

from .helpers import FAST, make_cfg, new_store, run_ablate, runs

# ---------------------------------------------------------------------------------------------------
# Names, from a sweep's definition (pure)


def test_a_sweep_varies_exactly_its_swept_computing_keys():
    varied = run_names.sweep_definition(
        ["experiment=smoke", "data.dir=/d", "seed=1,2,3", "model.dropout=0.5", "tracking.run_name=a,b"],
        {"model.dropout": "0,0.5", "augment": "none,standard", "model.freeze_bn": "false"},
    )
    # the command line's single dropout replaces the swept one; tracking.* is recording, not computing
    assert varied == {"augment": ["none", "standard"], "seed": ["1", "2", "3"]}
    assert run_names.sweep_definition(["train.fine_tune_lr=tag(log, interval(1e-6, 1e-2))"], None) == {
        "train.fine_tune_lr": []
    }


def test_every_job_of_a_grid_gets_its_own_short_name():
    grid = {"model.dropout": ["0", "0.2"], "augment": ["none", "standard"], "model.freeze_bn": ["false", "true"]}
    grid["seed"] = ["1", "2", "3"]
    names = []
    for num, values in enumerate(itertools.product(*grid.values())):
        overrides = ["experiment=val_beats_train", *(f"{k}={v}" for k, v in zip(grid, values, strict=True))]
        names.append(run_names.job_name(overrides, grid, num))
    assert len(set(names)) == len(names) == 24
    assert names[0] == "dropout=0 augment=none freeze_bn=false seed=1"
    assert all(len(n) <= rec.MAX_RUN_NAME_LENGTH for n in names)


def test_names_that_could_collide_or_overflow_carry_the_job_number():
    assert run_names.job_name(["seed=1"], {"seed": ["1", "1"]}, 1) == "seed=1 #1"
    long_value = "x" * 400
    name = run_names.job_name([f"data.dir={long_value}"], {"data.dir": [long_value, "y"]}, 7)
    assert len(name) == rec.MAX_RUN_NAME_LENGTH and name.endswith(" #7")
    # the same last part twice: the whole keys stay
    both = {"seed": ["1", "2"], "data.seed": ["1", "2"]}
    assert run_names.job_name(["seed=1", "data.seed=2"], both, 0) == "seed=1 data.seed=2"
    trial = run_names.job_name(["train.fine_tune_lr=0.000123456789"], {"train.fine_tune_lr": []}, 3, trial="3")
    assert trial == "trial 3 fine_tune_lr=0.000123"


def test_a_single_run_is_named_after_its_folder_and_settings(tmp_path):
    cfg = make_cfg(tmp_path / "alpaca", "sqlite:///unused.db", "model.dropout=0.5", "augment=none")
    assert run_names.run_name(cfg) == "alpaca MobileNetV2 fine_tune_at=150 dropout=0.5 augment=none seed=42"
    strong = make_cfg(tmp_path / "alpaca", "sqlite:///unused.db", "augment=strong", "augment.zoom=0.5")
    assert "augment=custom" in run_names.run_name(strong)
    named = make_cfg(tmp_path / "alpaca", "sqlite:///unused.db", "tracking.run_name=mine")
    assert run_names.run_name(named) == "mine"  # tracking.run_name wins


def test_a_parent_is_named_after_its_study_and_start():
    started = datetime.datetime(2026, 12, 7, 14, 2)
    config = OmegaConf.create(
        {
            "hydra": {
                "runtime": {"choices": {"experiment": "val_beats_train"}},
                "overrides": {"task": ["data.dir=/d"]},
                "sweeper": {"params": {"seed": "1,2,3"}},
            }
        }
    )
    assert run_names.parent_run_name(config, started) == "val_beats_train 2026-12-07 14:02"
    config.hydra.runtime.choices.experiment = None
    config.hydra.overrides.task = ["model.dropout=0,0.2"]
    assert run_names.parent_run_name(config, started) == "sweep seed x dropout 2026-12-07 14:02"


# ---------------------------------------------------------------------------------------------------
# Descriptions (pure)


def test_a_run_description_leads_with_chance_then_the_interval():
    summary = (
        "AT CHANCE: val_accuracy 0.500 ...\n\nphase 1, epoch 2 (step 1): a\nphase 2, epoch 4 (step 3): b\n\nlag = x"
    )
    text = run_description(summary, 0.5, (0.2, 0.8), 8, 0.5)
    lines = [line for line in text.splitlines() if line]
    assert lines[0] == "AT CHANCE: val_accuracy 0.500 ..."
    assert lines[1].startswith("val_accuracy 0.500, 95% interval 0.200–0.800 over 8 validation images")
    assert lines[2:] == ["- phase 1, epoch 2 (step 1): a", "- phase 2, epoch 4 (step 3): b", "_lag = x_"]


def test_the_report_summary_keeps_the_first_section_and_serves_its_figures():
    md = "# Report\n\nintro\n\n## Why\n\n- total: +4.5 points [-8.4, +17.3] (n=4)\n\n"
    md += "![gap decomposition](gap_decomposition.png)\n\n## Factors\n\nmore"
    text = report_description(md, "abc")
    assert text.startswith("Report\n\nintro")
    assert "intro" in text and "more" not in text
    assert r"+4.5 points \[-8.4, +17.3\] (n=4)" in text  # an interval, not a Markdown link
    assert "![gap decomposition](get-artifact?path=report/gap_decomposition.png&run_uuid=abc)" in text


# ---------------------------------------------------------------------------------------------------
# Preprocessing: built-in layers computing what keras.applications' preprocess_input computes


def _modules_with_preprocessing() -> list[str]:
    return sorted(n for n in dir(keras.applications) if hasattr(getattr(keras.applications, n), "preprocess_input"))


@pytest.mark.parametrize("name", _modules_with_preprocessing())
def test_the_builtin_preprocessing_computes_preprocess_input(name, tmp_path):
    """Every pixel value 0..255 and values between, in a traced model as training and the logged model run
    it: the built-in layer is within 4 float32 roundings of the output's size of ``preprocess_input`` on the
    same tensors, and a saved model gives the same numbers again without this package's classes."""
    pixels = np.concatenate([np.arange(256.0), np.linspace(0.0, 255.0, 1024) + 0.37]).astype("float32")
    batch = pixels[: (len(pixels) // 48) * 48].reshape(-1, 4, 4, 3)
    reference = getattr(keras.applications, name).preprocess_input
    expected = np.asarray(tf.function(lambda x: reference(x))(tf.constant(batch)))
    layer = preprocessing_layer(name)
    assert type(layer).__module__.startswith("keras.")  # Keras's own class
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, layer(inputs))
    got = model.predict(batch, verbose=0)
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert np.max(np.abs(got - expected)) <= 4 * np.finfo(np.float32).eps * scale
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", custom_objects={}, safe_mode=True)
    assert np.array_equal(loaded.predict(batch, verbose=0), got)


def test_mobilenet_v2s_preprocessing_is_bit_identical_where_the_model_runs_it():
    """In a traced model (fit, predict, the measuring passes) the Rescaling layer gives the same bits as
    ``preprocess_input`` traced: the demo's numbers did not move."""
    batch = np.random.RandomState(0).uniform(0, 255, (64, 8, 8, 3)).astype("float32")
    expected = np.asarray(tf.function(keras.applications.mobilenet_v2.preprocess_input)(tf.constant(batch)))
    inputs = keras.Input((8, 8, 3))
    got = keras.Model(inputs, preprocessing_layer("mobilenet_v2")(inputs)).predict(batch, verbose=0)
    assert np.array_equal(got, expected)
    assert len(PREPROCESSING_MODES) == 4


# ---------------------------------------------------------------------------------------------------
# End to end: the smoke study, shrunk, read back with MlflowClient

GRID_SIZE = 2  # model.dropout: 0, 0.5 (augment held at none)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, image_dir):
    tmp = tmp_path_factory.mktemp("smoke")
    uri = new_store(tmp)
    result = run_ablate(
        "-m",
        "experiment=smoke",
        *FAST,
        "train.initial_epochs=1",
        "train.fine_tune_epochs=1",
        "data=folder",
        f"data.dir={image_dir}",
        "data.image_size=32",
        "hydra.sweeper.params.augment=none",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={encode_value(str(tmp / 'sweep'))}",
        cwd=tmp,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    all_runs = runs(uri, "smoke")
    (parent,) = [r for r in all_runs if r.data.tags.get(rec.ROLE_TAG) == rec.PARENT_ROLE]
    children = [r for r in all_runs if r.data.tags.get(rec.MLFLOW_PARENT_RUN_TAG) == parent.info.run_id]
    return uri, parent, children, tmp


@pytest.mark.slow
def test_sweep_children_are_named_after_what_they_vary(smoke):
    _, parent, children, _ = smoke
    assert sorted(c.info.run_name for c in children) == ["dropout=0", "dropout=0.5"]
    assert {c.data.params["model.dropout"] for c in children} == {"0.0", "0.5"}
    name, day, minute = parent.info.run_name.split(" ")
    assert name == "smoke"
    started = datetime.datetime.fromtimestamp(parent.info.start_time / 1000)
    assert abs(datetime.datetime.strptime(f"{day} {minute}", "%Y-%m-%d %H:%M") - started).total_seconds() < 120


@pytest.mark.slow
def test_descriptions_carry_the_finding_and_the_question(smoke):
    uri, parent, children, _ = smoke
    client = mlflow.MlflowClient(uri)
    note = parent.data.tags[rec.DESCRIPTION_TAG]
    assert note.startswith("Study smoke (experiments/smoke.yaml): ")
    assert study_question("smoke").split(".")[0] in note  # the header of experiments/smoke.yaml
    assert "dropout" in note and "No replicates" in note
    assert f"ablate-report --parent-run {parent.info.run_id}" in note
    for child in children:
        text = child.data.tags[rec.DESCRIPTION_TAG]
        m, p = child.data.metrics, child.data.params
        n_val = sum(int(v) for k, v in p.items() if k.startswith(rec.VAL_COUNT_PARAM_PREFIX) and k[-6:] != ".total")
        first = text.split("\n\n")[0 if child.data.tags[rec.AT_CHANCE_TAG] == "false" else 1]
        assert first.startswith(f"val_accuracy {m['val_accuracy']:.3f}, 95% interval ")
        assert f"over {n_val} validation images" in first
        assert f"{m['val_accuracy_ci_low']:.3f}–{m['val_accuracy_ci_high']:.3f}" in first
        assert "- phase 2, epoch 2 (step 1)" in text  # then ": " or its own chance check (gap/sentence.py)
        assert f"get-artifact?path=gap.png&run_uuid={child.info.run_id}" in text
    experiment = client.get_experiment_by_name("smoke")
    assert "A first look" in experiment.tags[rec.DESCRIPTION_TAG]


@pytest.mark.slow
def test_the_splits_are_logged_as_datasets(smoke, image_dir):
    """Name, source, digest and per-class counts against Keras's own split of the folder, hashed here."""
    _, _, children, _ = smoke
    splits = keras.utils.image_dataset_from_directory(
        str(image_dir),
        validation_split=0.2,
        subset="both",
        seed=42,
        batch_size=None,
        image_size=(32, 32),
        verbose=False,
    )

    def digest(paths: list[str]) -> str:
        h = hashlib.sha256()
        for rel in sorted(Path(p).relative_to(image_dir).as_posix() for p in paths):
            h.update(f"{rel}\0{hashlib.sha256((image_dir / rel).read_bytes()).hexdigest()}\n".encode())
        return h.hexdigest()[: rec.DATASET_DIGEST_LENGTH]

    expected = {
        context: (digest(split.file_paths), Counter(Path(p).parent.name for p in split.file_paths))
        for context, split in zip(("training", "validation"), splits, strict=True)
    }
    for child in children:
        inputs = child.inputs.dataset_inputs
        assert len(inputs) == 2
        for one in inputs:
            context = {t.key: t.value for t in one.tags}[rec.DATASET_CONTEXT_TAG]
            ds = one.dataset
            assert ds.name == image_dir.name
            assert json.loads(ds.source) == {"uri": str(image_dir.resolve())}
            assert ds.digest == expected[context][0]
            profile = json.loads(ds.profile)
            assert profile["images_per_class"] == dict(expected[context][1])
            assert profile["images"] == sum(expected[context][1].values())


@pytest.mark.slow
def test_the_report_replaces_the_parents_description_with_its_summary(smoke):
    uri, parent, _, tmp = smoke
    report_app.main(["--parent-run", parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp / "report")])
    note = mlflow.MlflowClient(uri).get_run(parent.info.run_id).data.tags[rec.DESCRIPTION_TAG]
    report = (tmp / "report" / "report.md").read_text()
    assert note.startswith(report.split("\n\n")[0].removeprefix("# "))  # the report's own title, plain
    assert "## Factors" not in note
    assert "report/report.md" in note

"""GapCallback on the course's own model, as a learner's notebook has it (issue 34), against computations
that share none of its code.

The course's ``alpaca_model`` is built verbatim (augmentation ``Sequential`` inside a functional model,
``preprocess_input`` as plain ops, ``base_model(x, training=False)``, pooling, ``Dropout(0.2)``,
``Dense(1)`` logits, ``metrics=['accuracy']``) on the suite's offline pretrained MobileNetV2 (width 0.35)
at 32 px, and trained as the
course trains it: one epoch on the frozen base, then the base unfrozen from layer 120 (trainable
BatchNorm) and recompiled with a new optimizer for one more. The data are ``image_dataset_from_directory``
splits that reshuffle every epoch, as in the course.

The same training runs twice in one process: once plain, once with the callback, a hand-built check,
``CSVLogger`` and MLflow's own ``MlflowCallback`` on a real store. The hand-built check rebuilds every
condition at each epoch's end from the model's layers called with explicit flags (images read file by
file, losses in float64 NumPy); it shares with the callback only the documented seeding rule of the
measuring draws where no training order is given (seed state ``i`` of the augmentation and dropout layers
starts at ``(k + i, 0)``, ``k`` from the seed and the epoch: docs/gap-measurement.md), written out here, so
that the augmented batches and dropout masks are the same ones."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from keras import layers

from finetune_ablation import record as rec
from finetune_ablation.demo_base import demo_weights_path
from finetune_ablation.gap import GapCallback, probe

from .helpers import new_store
from .independent import Pass

IMG_SIZE = (32, 32)
BATCH = 8
PHASE1_EPOCHS = 2
SEED = 0  # GapCallback's default seed
THRESHOLD = 0.5  # the course's metrics=['accuracy'] on one logit is BinaryAccuracy(threshold=0.5)
COMPONENT_KEYS = [rec.gap_metric(c) for c in rec.GAP_COMPONENTS]
KERAS_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


# ---------------------------------------------------------------------------------------------------
# The course's code, as written there, with the suite's offline pretrained base (a MobileNetV2 of width
# 0.35, docs/demo.md) instead of the downloaded ImageNet one, at 32 px


def data_augmenter():
    data_augmentation = keras.Sequential()
    data_augmentation.add(layers.RandomFlip("horizontal"))
    data_augmentation.add(layers.RandomRotation(0.2))
    return data_augmentation


def alpaca_model(image_shape=IMG_SIZE, data_augmentation=None):
    input_shape = image_shape + (3,)  # noqa: RUF005 (the course's code, verbatim)
    base_model = keras.applications.MobileNetV2(
        input_shape=input_shape, include_top=False, alpha=0.35, weights=demo_weights_path()
    )
    base_model.trainable = False
    inputs = keras.Input(shape=input_shape)
    x = data_augmentation(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base_model(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1)(x)
    return keras.Model(inputs, outputs)


def course_datasets(image_dir: Path):
    kwargs = dict(shuffle=True, batch_size=BATCH, image_size=IMG_SIZE, validation_split=0.2, seed=42, verbose=False)
    train = keras.utils.image_dataset_from_directory(str(image_dir), subset="training", **kwargs)
    val = keras.utils.image_dataset_from_directory(str(image_dir), subset="validation", **kwargs)
    return train, val


def fresh_start(seed: int = 1) -> None:
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _moving_means(base: keras.Model) -> list[np.ndarray]:
    return [np.array(layer.moving_mean) for layer in base.layers if isinstance(layer, layers.BatchNormalization)]


def train_course(image_dir: Path, callbacks=lambda train, val: []) -> dict:
    """The course's two phases; ``callbacks(train, val)`` gives the callbacks both fits get."""
    fresh_start()
    train_dataset, validation_dataset = course_datasets(image_dir)
    model = alpaca_model(data_augmentation=data_augmenter())
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.001),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    extra = callbacks(train_dataset, validation_dataset)
    history = model.fit(
        train_dataset, validation_data=validation_dataset, epochs=PHASE1_EPOCHS, callbacks=extra, verbose=0
    )
    base_model = model.layers[2]  # Keras 3 lists no layer for preprocess_input's ops (the course's tf.keras: 4)
    base_model.trainable = True
    for layer in base_model.layers[:120]:
        layer.trainable = False
    model.compile(
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        optimizer=keras.optimizers.Adam(learning_rate=0.0001),
        metrics=["accuracy"],
    )
    before = _moving_means(base_model)
    fine = model.fit(
        train_dataset,
        epochs=PHASE1_EPOCHS + 1,
        initial_epoch=PHASE1_EPOCHS,
        validation_data=validation_dataset,
        callbacks=extra,
        verbose=0,
    )
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(before, _moving_means(base_model), strict=True))
    return {
        "model": model,
        "base": base_model,
        "history": {k: history.history[k] + fine.history[k] for k in history.history},
        "bn_moved": moved,
        "train": train_dataset,
        "val": validation_dataset,
        "callbacks": extra,
    }


# ---------------------------------------------------------------------------------------------------
# The hand-built check


def read_files(paths: list[str], class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images read file by file (they are 32 px already: no resizing), labels from their folder."""
    images = [keras.utils.img_to_array(keras.utils.load_img(p)) for p in paths]
    labels = np.array([class_names.index(Path(p).parent.name) for p in paths], dtype=np.float32)
    return np.stack(images).astype(np.float32), labels


def preprocess(x):
    """MobileNetV2's preprocess_input, written out: pixels to [-1, 1]."""
    return tf.constant(x) / 127.5 - 1.0


class HandBuiltCheck(keras.callbacks.Callback):
    """At every epoch's end, after GapCallback: every variable as the epoch left it, every condition and
    validation rebuilt by hand and compared, the components summed, then everything put back."""

    def __init__(self, train, val):
        super().__init__()
        self.train, self.val = train, val
        self.checked: list[int] = []

    def on_test_begin(self, logs=None):
        self.snapshot = [np.array(v.numpy(), copy=True) for v in self.model.variables]

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        for before, v in zip(self.snapshot, model.variables, strict=True):  # measuring changed nothing
            np.testing.assert_array_equal(before, v.numpy(), err_msg=v.path)
        aug, base, pool, drop, head = (
            model.layers[1],
            model.layers[2],
            model.layers[3],
            model.layers[4],
            model.layers[5],
        )
        seeds = [v for layer in (*aug.layers, drop) for v in layer.variables if "seed_generator_state" in v.path]
        k = int(np.random.SeedSequence([SEED, epoch]).generate_state(1)[0])  # one stream per layer
        for i, state in enumerate(seeds):
            state.assign(np.array([(k + i) % (2**31 - 2), 0], dtype=state.dtype))
        bn_stats = [
            v for bn in base.layers if isinstance(bn, layers.BatchNormalization) for v in bn.non_trainable_variables
        ]
        drop_seeds = [v for v in drop.variables if "seed_generator_state" in v.path]
        passes = {name: Pass() for name in ("train_mode", "no_batchnorm", "no_dropout", "train_clean")}
        images, labels = self.train
        for start in range(0, len(labels), BATCH):
            x, y = images[start : start + BATCH], labels[start : start + BATCH]
            augmented = aug(x, training=True)
            stats = [np.array(v.numpy(), copy=True) for v in bn_stats]
            f_train = pool(base(preprocess(augmented), training=True))  # batch statistics
            for v, value in zip(bn_stats, stats, strict=True):  # training mode assigned them: put back
                v.assign(value)
            f_moving = pool(base(preprocess(augmented), training=False))
            masks = [np.array(v.numpy(), copy=True) for v in drop_seeds]
            passes["train_mode"].add(drop(f_train, training=True), head, y)
            for v, value in zip(drop_seeds, masks, strict=True):  # the same dropout mask again
                v.assign(value)
            passes["no_batchnorm"].add(drop(f_moving, training=True), head, y)
            passes["no_dropout"].add(f_moving, head, y)
            passes["train_clean"].add(pool(base(preprocess(x), training=False)), head, y)
        val = Pass()
        val_images, val_labels = self.val
        for start in range(0, len(val_labels), BATCH):
            x = val_images[start : start + BATCH]
            val.add(pool(base(preprocess(x), training=False)), head, val_labels[start : start + BATCH])
        for name, hand in passes.items():
            hand.compare(logs[f"{name}_accuracy"], logs[f"{name}_loss"], name, THRESHOLD)
        val.compare(logs["val_accuracy"], logs["val_loss"], "val", THRESHOLD)
        for v, value in zip(model.variables, self.snapshot, strict=True):
            v.assign(value)
        self.checked.append(epoch)


@pytest.fixture(scope="module")
def course(image_dir, tmp_path_factory):
    """The course's training twice: plain, and measured (with everything that reads the logs after it)."""
    folder = tmp_path_factory.mktemp("course")
    plain = train_course(image_dir)
    uri = new_store(folder)
    mlflow.set_tracking_uri(uri)
    made: dict = {}

    def measuring(train, val):
        class_names = train.class_names
        made["gap"] = GapCallback(train_data=train, validation_data=val)
        made["check"] = HandBuiltCheck(
            read_files(train.file_paths, class_names), read_files(val.file_paths, class_names)
        )
        made["csv"] = folder / "history.csv"
        return [
            made["gap"],
            made["check"],
            keras.callbacks.CSVLogger(str(made["csv"]), append=True),
            mlflow.keras.MlflowCallback(),
        ]

    with mlflow.start_run() as run:
        measured = train_course(image_dir, measuring)
    return {"plain": plain, "measured": measured, "uri": uri, "run_id": run.info.run_id, **made}


@pytest.mark.slow
def test_each_condition_equals_a_hand_built_pass_in_both_phases(course):
    assert course["check"].checked == [*range(PHASE1_EPOCHS), PHASE1_EPOCHS]
    assert course["gap"].how.startswith("staged")  # the course's model is cut into stages in Keras 3.15


@pytest.mark.slow
def test_measuring_changes_nothing_in_the_course_model(course):
    plain, measured = course["plain"], course["measured"]
    for a, b in zip(plain["model"].variables, measured["model"].variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for key in KERAS_KEYS:
        assert plain["history"][key] == measured["history"][key], key


@pytest.mark.slow
def test_components_sum_to_keras_own_gap(course):
    history = course["measured"]["history"]
    for epoch in range(PHASE1_EPOCHS + 1):
        total = history[rec.GAP_TOTAL][epoch]
        assert total == history["val_accuracy"][epoch] - history["accuracy"][epoch]  # Keras's own two numbers
        # the five differences telescope: their sum is the total up to float64 rounding of its terms
        assert math.fsum(history[k][epoch] for k in COMPONENT_KEYS) == pytest.approx(total, abs=1e-12)
        loss_total = history["val_loss"][epoch] - history["loss"][epoch]
        assert history[f"{rec.GAP_LOSS_PREFIX}total"][epoch] == loss_total
        loss_parts = [history[f"{rec.GAP_LOSS_PREFIX}{c}"][epoch] for c in rec.GAP_COMPONENTS]
        assert math.fsum(loss_parts) == pytest.approx(loss_total, abs=1e-12 * max(1.0, abs(history["loss"][epoch])))


@pytest.mark.slow
def test_history_csv_logger_and_mlflow_callback_record_the_same_numbers(course):
    history = course["measured"]["history"]
    keys = [*COMPONENT_KEYS, "train_clean_accuracy", "train_mode_loss", "val_accuracy_ci_low", "val_accuracy_ci_high"]
    csv = pd.read_csv(course["csv"])
    client = mlflow.MlflowClient(course["uri"])
    for key in keys:
        assert len(history[key]) == PHASE1_EPOCHS + 1, key
        assert csv[key].tolist() == pytest.approx(history[key], rel=1e-6), key  # CSV: printed decimals
        logged = sorted((m.step, m.value) for m in client.get_metric_history(course["run_id"], key))
        assert [step for step, _ in logged] == list(range(PHASE1_EPOCHS + 1)), key
        assert [value for _, value in logged] == pytest.approx(history[key], rel=1e-6), key


@pytest.mark.slow
def test_summary_and_plot_speak_per_phase(course, capsys):
    gap = course["gap"]
    text = gap.summary()
    assert capsys.readouterr().out == text
    last = PHASE1_EPOCHS  # the epoch index of phase 2's one epoch
    phase_lines = [line for line in text.splitlines() if line.startswith("phase ")]
    # each phase's line may carry its own chance check between where it is and the sentence
    assert [line.split(":")[0].split(", AT CHANCE")[0] for line in phase_lines] == [
        f"phase 1, epoch {last} (step {last - 1})",
        f"phase 2, epoch {last + 1} (step {last})",
    ], phase_lines
    figure = gap.plot()
    bars = list(figure.axes[0].patches)
    assert len(bars) == (PHASE1_EPOCHS + 1) * len(rec.GAP_COMPONENTS)  # a bar per component per measured epoch


@pytest.mark.slow
def test_the_probe_agrees_with_the_course_models_own_batchnorm(course):
    """The unfrozen BatchNorm of the course's base, called with training=False, moved during fine-tuning
    exactly when the probe (tiny models) says training=False does not keep it in inference mode."""
    assert probe().training_false_keeps_bn_frozen == (course["measured"]["bn_moved"] == 0.0)

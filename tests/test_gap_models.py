"""GapCallback on the model shapes a notebook brings (issue 34): TF's transfer-learning tutorial, a
Sequential model with a sigmoid output, softmax over three classes with its own metric name, a model
whose augmentation sits after a layer with weights, and augmentation done in ``tf.data``.

Small real Keras models on generated images. Each run's numbers are checked against Keras itself:
``train_clean_*`` against ``model.evaluate`` on the training split in order (Keras's own loss and
metric, a graph that shares no code with the callback's passes), the components against Keras's own
``val - train`` gap; and the two measuring mechanisms (staged passes, whole-model passes) against each
other on the same model state."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from finetune_ablation import record as rec
from finetune_ablation.gap import GapCallback
from finetune_ablation.gap.meter import GapMeter
from finetune_ablation.gap.scoring import Scorer
from finetune_ablation.gap.whole import WholeModelMeter

from .test_gap_callback import course_datasets, fresh_start

SIZE = 32
# float32 rounds at 6e-8; a small model's loss, averaged over 32 examples in another order or graph,
# stays well below 1e-6 of its size
RELATIVE = 1e-5


def tiny_base(name: str = "tiny_base") -> keras.Model:
    """A pretrained base's shape in miniature: convolutions with BatchNorm."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, strides=2, use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(16, 3, strides=2, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    return keras.Model(inputs, x, name=name)


def tutorial_model() -> tuple[keras.Model, keras.Model]:
    """TF's transfer-learning tutorial's model, on a tiny base."""
    base_model = tiny_base()
    base_model.trainable = False
    data_augmentation = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.2)])
    inputs = keras.Input(shape=(SIZE, SIZE, 3))
    x = data_augmentation(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base_model(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0, name="accuracy")],
    )
    return model, base_model


def sequential_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            layers.RandomFlip("horizontal"),
            layers.Rescaling(1 / 255),
            layers.Conv2D(8, 3, strides=2),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.GlobalAveragePooling2D(),
            layers.Dropout(0.3),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["acc"])
    return model


def softmax_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.RandomFlip("horizontal")(inputs)
    x = layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = tiny_base()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(x))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
    )
    return model


def augmentation_after_weights_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(8, 3, strides=2)(x)
    x = layers.RandomFlip("horizontal")(x)  # augmentation of feature maps: no stage boundary before it
    x = layers.BatchNormalization()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    model = keras.Model(inputs, layers.Dense(1)(x))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
    )
    return model


def plain_model() -> keras.Model:
    """No augmentation layer: the data pipeline augments."""
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            layers.Rescaling(1 / 255),
            layers.Conv2D(8, 3, strides=2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
    )
    return model


def three_class_arrays(image_dir) -> tuple[np.ndarray, np.ndarray]:
    """The image folder as arrays, labelled into three classes by brightness (learnable, no new files)."""
    train, _ = course_datasets(image_dir)
    x = np.concatenate([images.numpy() for images, _ in train.unbatch().batch(1000)])
    brightness = x.mean(axis=(1, 2, 3))
    y = np.digitize(brightness, np.quantile(brightness, [1 / 3, 2 / 3])).astype(np.int32)
    return x, y


def assert_gap_is_keras_own(history: dict, accuracy: str) -> None:
    components = [history[rec.gap_metric(c)] for c in rec.GAP_COMPONENTS]
    for epoch, total in enumerate(history[rec.GAP_TOTAL]):
        assert total == history[f"val_{accuracy}"][epoch] - history[accuracy][epoch]
        assert math.fsum(c[epoch] for c in components) == pytest.approx(total, abs=1e-12)


def assert_clean_equals_evaluate(model: keras.Model, gap: GapCallback, accuracy: str) -> None:
    """The last epoch's train_clean against Keras's own evaluate of the training split in order (the same
    model state: nothing changed after the last epoch's measurement). An accuracy may differ only by the
    examples whose output lies within rounding of the decision threshold."""
    results = model.evaluate(gap.train_data, return_dict=True, verbose=0)
    last = gap.rows[-1]
    assert last["train_clean_loss"] == pytest.approx(results["loss"], rel=RELATIVE)
    outputs = model.predict(gap.train_data, verbose=0)
    count = len(outputs)
    if outputs.shape[-1] == 1:
        threshold = 0.5 if model.layers[-1].activation is keras.activations.sigmoid else 0.0
        borderline = int(np.sum(np.abs(outputs - threshold) <= RELATIVE * (1 + np.abs(outputs))))
    else:
        top2 = np.sort(outputs, axis=-1)[:, -2:]
        borderline = int(np.sum(top2[:, 1] - top2[:, 0] <= RELATIVE))
    assert abs(round(last["train_clean_accuracy"] * count) - round(results[accuracy] * count)) <= borderline


@pytest.mark.slow
def test_the_tutorial_model_in_both_phases(image_dir):
    fresh_start()
    train, val = course_datasets(image_dir)
    model, base_model = tutorial_model()
    gap = GapCallback(train_data=train, validation_data=val, verbose=False)
    first = model.fit(train, validation_data=val, epochs=2, callbacks=[gap], verbose=0).history
    base_model.trainable = True  # the tutorial's fine-tuning: everything, BatchNorm included
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=0.001),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0, name="accuracy")],
    )
    second = model.fit(train, validation_data=val, epochs=3, initial_epoch=2, callbacks=[gap], verbose=0).history
    assert gap.how.startswith("staged")
    for history in (first, second):
        assert_gap_is_keras_own(history, "accuracy")
    assert second[rec.gap_metric("batchnorm")][0] != 0.0  # trainable BatchNorm in batch vs moving mode
    assert first[rec.gap_metric("batchnorm")] == [0.0, 0.0]  # frozen: no BatchNorm effect, by construction
    assert_clean_equals_evaluate(model, gap, "accuracy")


@pytest.mark.slow
def test_staged_and_whole_model_passes_measure_the_same_conditions(image_dir):
    """The two mechanisms on one model state (trainable BatchNorm, augmentation, dropout): the same seed
    rule gives the same draws, so every condition agrees up to float rounding."""
    fresh_start()
    train, val = course_datasets(image_dir)
    model, base_model = tutorial_model()
    base_model.trainable = True
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0, name="accuracy")],
    )
    gap = GapCallback(train_data=train, validation_data=val, verbose=False)
    model.fit(train, validation_data=val, epochs=1, callbacks=[gap], verbose=0)
    scorer = Scorer.of(model)
    staged = GapMeter(model, gap.train_data, seed=3).measure(5, scorer)
    whole = WholeModelMeter(model, gap.train_data, seed=3).measure(5, scorer)
    assert staged["train_count"] == whole["train_count"] == 32
    for name in ("train_mode", "no_batchnorm", "no_dropout", "train_clean"):
        assert staged[f"{name}_loss"] == pytest.approx(whole[f"{name}_loss"], rel=RELATIVE), name
        assert staged[f"{name}_correct"] == whole[f"{name}_correct"], name


@pytest.mark.slow
def test_a_sequential_model_with_a_sigmoid_output_and_its_own_metric_name(image_dir):
    fresh_start()
    train, val = course_datasets(image_dir)
    model = sequential_model()
    gap = GapCallback(train_data=train, validation_data=val, verbose=False)
    history = model.fit(train, validation_data=val, epochs=2, callbacks=[gap], verbose=0).history
    assert gap.how.startswith("staged")
    assert {"train_mode_accuracy", "gap/total", "val_accuracy_ci_low", "train_clean_accuracy_ci_high"} <= set(history)
    assert_gap_is_keras_own(history, "acc")
    assert_clean_equals_evaluate(model, gap, "acc")


@pytest.mark.slow
def test_softmax_over_three_classes_on_arrays(image_dir):
    fresh_start()
    x, y = three_class_arrays(image_dir)
    model = softmax_model()
    gap = GapCallback(train_data=(x[:24], y[:24]), validation_data=(x[24:], y[24:]), batch_size=8, verbose=False)
    history = model.fit(
        x[:24], y[:24], validation_data=(x[24:], y[24:]), epochs=2, batch_size=8, callbacks=[gap], verbose=0
    )
    assert_gap_is_keras_own(history.history, "acc")
    assert_clean_equals_evaluate(model, gap, "acc")
    last = gap.rows[-1]  # the interval is over the 8 validation examples counted from validation_data
    assert last["val_accuracy_ci_low"] <= history.history["val_acc"][-1] <= last["val_accuracy_ci_high"]


@pytest.mark.slow
def test_augmentation_after_layers_with_weights_is_measured_on_the_whole_model(image_dir, capsys):
    fresh_start()
    train, val = course_datasets(image_dir)
    model = augmentation_after_weights_model()
    gap = GapCallback(train_data=train, validation_data=val)
    history = model.fit(train, validation_data=val, epochs=2, callbacks=[gap], verbose=0).history
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if line.startswith("GapCallback:")]
    assert len(notes) == 1 and "whole model" in notes[0] and "random_flip" in notes[0]
    assert gap.how.startswith("whole-model")
    assert_gap_is_keras_own(history, "accuracy")
    assert_clean_equals_evaluate(model, gap, "accuracy")


@pytest.mark.slow
def test_augmentation_in_tf_data_is_named_once_and_the_rest_measured(image_dir, capsys):
    fresh_start()
    train, val = course_datasets(image_dir)
    augmented = train.map(lambda x, y: (tf.image.random_flip_left_right(x, seed=1), y))
    model = plain_model()
    gap = GapCallback(train_data=train, validation_data=val)
    history = model.fit(augmented, validation_data=val, epochs=2, callbacks=[gap], verbose=0).history
    model.fit(augmented, validation_data=val, epochs=3, initial_epoch=2, callbacks=[gap], verbose=0)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GapCallback:")]
    assert len(notes) == 1 and "no augmentation layers" in notes[0] and "tf.data" in notes[0]
    assert history[rec.gap_metric("augmentation")] == [0.0, 0.0]  # nothing in the model to switch off
    assert history[rec.gap_metric("dropout")] == [0.0, 0.0]
    assert_gap_is_keras_own(history, "accuracy")


@pytest.mark.slow
def test_mlflow_autolog_records_the_gap_too(image_dir, tmp_path):
    """autolog appends its own callback after the user's: it logs the logs GapCallback filled."""
    import mlflow

    from .helpers import new_store

    fresh_start()
    train, val = course_datasets(image_dir)
    model = sequential_model()
    mlflow.set_tracking_uri(new_store(tmp_path))
    mlflow.keras.autolog(log_models=False)
    try:
        with mlflow.start_run() as run:
            history = model.fit(
                train, validation_data=val, epochs=2, callbacks=[GapCallback(train_data=train)], verbose=0
            )
    finally:
        mlflow.keras.autolog(disable=True)
    logged = mlflow.MlflowClient().get_metric_history(run.info.run_id, rec.GAP_TOTAL)
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(history.history[rec.GAP_TOTAL])

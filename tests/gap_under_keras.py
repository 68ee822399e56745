"""The suite's ``GapCallback`` and ``check`` on the course's model shape in miniature, in whatever Keras this
interpreter has; prints one JSON object. Run by ``tests/test_other_keras.py`` in each Keras env of
``tests/other_keras.py`` (the working tree's ``src/`` first on the path); also runnable by hand:
``python tests/gap_under_keras.py``.

The model is the course's ``alpaca_model`` at 16 px with a one-convolution base: augmentation as a
``Sequential`` inside a functional model, ``preprocess_input``'s arithmetic as plain operations,
``base(x, training=False)``, ``GlobalAveragePooling2D``, ``Dropout(0.2)``, ``Dense(1)`` logits,
``metrics=['accuracy']``. It trains as the course trains: the head on the frozen base, then the base
unfrozen (its BatchNorm trainable) and recompiled with a new optimizer. The same two phases run twice from
the same seeds, once without the callback, so the test can compare the weights.

Besides what the suite reports (the check's findings, the callback's rows), it records what Keras itself did,
without the suite's code: how far the base's BatchNorm moving mean moved during the second ``fit``, and
Keras's own ``evaluate`` and ``predict`` of the training split after the last epoch. Under Keras 2
(``TF_USE_LEGACY_KERAS=1``) the model is tf-keras's, and the script records how the suite refuses it.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    import tf_keras as keras  # Keras 2, the course's tf.keras: the suite must refuse its models in one line
else:
    import keras

from finetune_ablation.gap import GapCallback, check, probe

SIZE = 16
BATCH = 16
PHASE1_EPOCHS = 3


def splits() -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Two classes told apart by brightness, 160 training and 64 validation images, batched; the training split
    reshuffles every epoch from a seed, as ``image_dataset_from_directory(shuffle=True, seed=...)`` does."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 224).astype("float32")
    shift = 40 * labels + rng.normal(0, 25, 224)  # brightness: the class, and noise that makes errors
    images = rng.uniform(0, 160, (224, SIZE, SIZE, 3)) + shift[:, None, None, None]
    images = np.clip(images, 0, 255).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((images[:160], labels[:160]))
    train = train.shuffle(160, seed=1, reshuffle_each_iteration=True).batch(BATCH)
    val = tf.data.Dataset.from_tensor_slices((images[160:], labels[160:])).batch(BATCH)
    return train, val


def alpaca_model() -> tuple[keras.Model, keras.Model]:
    """The course's model in miniature, and its base."""
    inputs_base = keras.Input((SIZE, SIZE, 3))
    y = keras.layers.Conv2D(8, 3, padding="same")(inputs_base)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    base_model = keras.Model(inputs_base, y, name="base")
    base_model.trainable = False
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
    inputs = keras.Input((SIZE, SIZE, 3))
    x = augment(inputs)
    x = x / 127.5 - 1.0  # preprocess_input's arithmetic, plain operations
    x = base_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1)(x)
    return keras.Model(inputs, outputs), base_model


def compile_course(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def findings(found) -> list[dict]:
    return [{"severity": f.severity, "message": f.message} for f in found]


def train(measured: bool) -> dict:
    """Both phases from the same seeds; with ``measured``, the callback in both fits and the check before each."""
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    train_data, val_data = splits()
    model, base_model = alpaca_model()
    compile_course(model, 0.1)
    out: dict = {}
    gap = GapCallback(train_data=train_data, validation_data=val_data, verbose=False) if measured else None
    callbacks = [gap] if measured else []
    if measured:
        out["check_before"] = findings(check(model, train_data, val_data, verbose=False))
    model.fit(train_data, validation_data=val_data, epochs=PHASE1_EPOCHS, callbacks=callbacks, verbose=0)
    base_model.trainable = True
    if measured:
        out["check_unfrozen"] = findings(check(model, base=base_model, verbose=False))
    compile_course(model, 0.01)
    bn = base_model.layers[2]
    before = keras.ops.convert_to_numpy(bn.moving_mean)
    model.fit(
        train_data,
        validation_data=val_data,
        epochs=PHASE1_EPOCHS + 1,
        initial_epoch=PHASE1_EPOCHS,
        callbacks=callbacks,
        verbose=0,
    )
    out["bn_moving_mean_change"] = float(np.abs(keras.ops.convert_to_numpy(bn.moving_mean) - before).max())
    out["weights"] = [np.asarray(v).tolist() for v in model.weights]
    if measured:
        out["rows"] = gap.rows
        out["how"] = gap.how
        out["summary"] = gap.summary()
        results = model.evaluate(gap.train_data, return_dict=True, verbose=0)
        out["evaluate"] = {"loss": float(results["loss"]), "accuracy": float(results["accuracy"])}
        out["train_logits"] = model.predict(gap.train_data, verbose=0)[:, 0].tolist()
    return out


def _versions_and_probe(behaviour) -> dict:
    """The Keras under test and what the probe found in it."""
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "probe": {
            "training_false_keeps_bn_frozen": behaviour.training_false_keeps_bn_frozen,
            "dropout_after_training_false_active": behaviour.dropout_after_training_false_active,
        },
    }


def under_keras2() -> dict:
    """Under Keras 2: what ``check`` and ``GapCallback`` say of a Keras 2 model, and the probe's answers."""
    train_data, val_data = splits()
    model, _ = alpaca_model()
    compile_course(model, 0.1)
    refused = ""
    try:
        model.fit(train_data, validation_data=val_data, callbacks=[GapCallback(train_data=train_data)], verbose=0)
    except TypeError as exc:
        refused = str(exc)
    return {
        **_versions_and_probe(probe(tf.keras)),
        "check_before": findings(check(model, verbose=False)),
        "callback_refused": refused,
    }


def main() -> dict:
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        return under_keras2()
    behaviour = probe()
    plain, measured = train(measured=False), train(measured=True)
    return {
        **_versions_and_probe(behaviour),
        "same_weights_without_the_callback": plain["weights"] == measured.pop("weights"),
        "plain_bn_moving_mean_change": plain["bn_moving_mean_change"],
        **measured,
    }


if __name__ == "__main__":
    print(json.dumps(main()))

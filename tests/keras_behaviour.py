"""Measure, in whatever Keras this interpreter has, the two behaviours that changed after Keras 3.15
(docs/stack-facts.md, V1 and V2), and one that did not, and print them as one JSON object.

Run by ``tests/test_other_keras.py`` in every Keras environment of ``tests/other_keras.py`` (Keras 2 when
``TF_USE_LEGACY_KERAS=1``); also runnable by hand: ``python tests/keras_behaviour.py``. It imports nothing
from the suite, so it measures Keras, not the suite's code.

The model is the course's shape in miniature: a functional base (convolution + BatchNormalization) called
as ``base(x, training=False)`` inside the outer model, then ``GlobalAveragePooling2D``, ``Dropout(0.9)``
and a ``Dense`` logit; a second model puts the course's augmentation (``RandomFlip``, ``RandomRotation``)
before the base instead. Learning rate 0, so ``fit`` changes no weight: what changes is only what the
training flag reaches.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    import tf_keras as keras  # Keras 2, the course's tf.keras
else:
    import keras

BATCH = 32
MOMENTUM = 0.5  # large, so one epoch moves a trainable moving mean far from its initial 0


def build_base():
    """A functional base, convolution + BatchNormalization, and its BatchNormalization layer."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=MOMENTUM)(x)
    base = keras.Model(inputs, x, name="base")
    return base, base.layers[-1]


def build():
    """The base called with ``training=False``, then pooling, ``Dropout(0.9)`` and the logit."""
    keras.utils.set_random_seed(0)
    base, bn = build_base()
    outer_in = keras.Input((8, 8, 3))
    y = base(outer_in, training=False)
    y = keras.layers.GlobalAveragePooling2D()(y)
    y = keras.layers.Dropout(0.9)(y)
    out = keras.layers.Dense(1)(y)
    return keras.Model(outer_in, out), bn


def build_augmented():
    """Augmentation (a ``Sequential``, as in the course), then the frozen-BN base with ``training=False``."""
    keras.utils.set_random_seed(0)
    base, bn = build_base()
    bn.trainable = False
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
    outer_in = keras.Input((8, 8, 3))
    y = base(augment(outer_in), training=False)
    out = keras.layers.Dense(1)(keras.layers.Flatten()(y))  # no pooling: a flip changes the logit
    return keras.Model(outer_in, out)


def compile_at_lr0(model) -> None:
    """A new optimizer each time (Keras 3 refuses a built one for a new trainable set)."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=keras.losses.MeanSquaredError())


def main() -> dict:
    rng = np.random.default_rng(0)
    x = (rng.random((BATCH, 8, 8, 3)) * 4 + 3).astype("float32")  # mean 5: far from the moving mean's 0
    y = rng.normal(size=(BATCH, 1)).astype("float32")
    model, bn = build()

    # 1. BatchNorm: unfrozen, inside base(x, training=False); one epoch of one batch.
    compile_at_lr0(model)
    before = bn.moving_mean.numpy().copy()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    bn_change = float(np.abs(bn.moving_mean.numpy() - before).max())

    # 2. Dropout after the base, with the BatchNorm frozen (a frozen BN always uses its moving statistics,
    # docs/stack-facts.md K1), so the only layer whose mode can differ between fit and evaluate is Dropout.
    bn.trainable = False
    compile_at_lr0(model)
    fit_loss = float(model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history["loss"][0])
    eval_loss = float(model.evaluate(x, y, batch_size=BATCH, verbose=0))
    # the same inference loss by hand, from the model's own call in inference mode
    pred = np.asarray(model(x, training=False))
    hand_loss = float(np.mean((pred - y) ** 2))

    # 3. Augmentation before the base: the same comparison.
    augmented = build_augmented()
    compile_at_lr0(augmented)
    aug_fit_loss = float(augmented.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history["loss"][0])
    aug_eval_loss = float(augmented.evaluate(x, y, batch_size=BATCH, verbose=0))
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "bn_moving_mean_change": bn_change,
        "fit_loss": fit_loss,
        "inference_loss": eval_loss,
        "hand_inference_loss": hand_loss,
        "augmented_fit_loss": aug_fit_loss,
        "augmented_inference_loss": aug_eval_loss,
    }


if __name__ == "__main__":
    print(json.dumps(main()))

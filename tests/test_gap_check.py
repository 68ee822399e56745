"""``check(model)`` and the Keras probe (issue 34, section 3), on small real models.

Every finding is checked against what Keras then really does: the trainable set that ``fit`` trains,
whether an unfrozen BatchNorm's moving statistics move, what ``evaluate``'s accuracy counts, whether a
bare call augments, which validation images are training images; and the fix each finding names is
applied and shown to work. The probe's answer is checked against a different model's real ``fit``."""

from __future__ import annotations

import random

import keras
import numpy as np
import pytest
from keras import layers

from finetune_ablation.gap import check, probe
from finetune_ablation.gap import keras_probe as probe_module

from .test_gap_callback import course_datasets, fresh_start
from .test_gap_models import SIZE, tiny_base, tutorial_model


def severities(findings, text: str) -> list[str]:
    return [f.severity for f in findings if text in f.message]


def one_step(model, train) -> None:
    model.fit(train.take(1), epochs=1, verbose=0)


@pytest.mark.slow
def test_the_trainable_set_changed_since_compile_is_found_and_the_fix_works(image_dir):
    fresh_start()
    train, _ = course_datasets(image_dir)
    model, base_model = tutorial_model()
    one_step(model, train)
    assert severities(check(model, verbose=False), "optimizer was built") == ["ok"]
    base_model.trainable = True  # unfrozen, not recompiled
    findings = check(model, verbose=False)
    assert severities(findings, "trainable set changed since the last compile") == ["problem"]
    kernel = base_model.layers[1].kernel
    before = np.array(kernel.numpy())
    one_step(model, train)  # the claim: fit still trains the old set (the head only)
    np.testing.assert_array_equal(kernel.numpy(), before)
    model.compile(  # the fix: recompile with a NEW optimizer
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0, name="accuracy")],
    )
    one_step(model, train)
    assert not np.array_equal(kernel.numpy(), before)
    assert severities(check(model, verbose=False), "optimizer was built") == ["ok"]


@pytest.mark.slow
def test_unfrozen_batchnorm_under_training_false_is_judged_by_the_probe_and_the_fix_works(image_dir):
    fresh_start()
    train, _ = course_datasets(image_dir)
    model, base_model = tutorial_model()
    base_model.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    findings = check(model, verbose=False)
    expected = "ok" if probe().training_false_keeps_bn_frozen else "problem"
    assert severities(findings, "BatchNormalization layers of tiny_base are trainable") == [expected]
    bn = next(layer for layer in base_model.layers if isinstance(layer, layers.BatchNormalization))
    before = np.array(bn.moving_mean.numpy())
    one_step(model, train)
    moved = not np.array_equal(bn.moving_mean.numpy(), before)
    assert moved == (expected == "problem")  # what the finding says, in this model's own fit
    for layer in base_model.layers:  # the fix the finding names
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    assert severities(check(model, verbose=False), "BatchNormalization") == []
    before = np.array(bn.moving_mean.numpy())
    one_step(model, train)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)


@pytest.mark.slow
def test_accuracy_on_logits_is_found_before_and_after_fit_and_is_what_evaluate_counts(image_dir):
    fresh_start()
    train, _ = course_datasets(image_dir)
    model, _ = tutorial_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=["accuracy"],  # the course's
    )
    assert severities(check(model, verbose=False), "thresholds them at 0.5") == ["problem"]
    model.fit(train, epochs=2, verbose=0)
    assert severities(check(model, verbose=False), "thresholds them at 0.5") == ["problem"]
    # the claim, by hand: Keras's accuracy counts logit > 0.5 as class 1
    x = np.concatenate([images.numpy() for images, _ in train])
    y = np.concatenate([labels.numpy() for _, labels in train])
    logits = model.predict(x, verbose=0)[:, 0]
    keras_accuracy = model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]
    assert keras_accuracy == pytest.approx(np.mean((logits > 0.5) == (y > 0.5)), abs=1e-6)
    model.compile(  # the fix the finding names
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
    )
    assert severities(check(model, verbose=False), "thresholds") == []
    keras_accuracy = model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]
    assert keras_accuracy == pytest.approx(np.mean((logits > 0.0) == (y > 0.5)), abs=1e-6)
    sigmoid = keras.Sequential([keras.Input((4,)), layers.Dense(1, activation="sigmoid")])
    sigmoid.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    assert severities(check(sigmoid, verbose=False), "thresholds") == []


@pytest.mark.slow
def test_a_bare_call_augments_and_the_split_is_checked(image_dir, capsys):
    fresh_start()
    train, val = course_datasets(image_dir)
    model, _ = tutorial_model()
    capsys.readouterr()
    findings = check(model, train, val)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(f) for f in findings]  # one line per finding
    assert all(line.split(":")[0] in ("PROBLEM", "NOTE", "OK") for line in printed)
    assert severities(findings, "augments") == ["note"]
    x = next(iter(train))[0][:1]
    calls = [np.asarray(model(x)) for _ in range(4)]  # the claim: a bare call augments
    assert any(not np.array_equal(c, calls[0]) for c in calls[1:])
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(model(x, training=False)))
    assert severities(findings, "validation images is a copy") == ["ok"]
    # the model holds the base the user unfroze, and not another one
    assert severities(findings, "is tiny_base itself") == ["ok"]
    other = tiny_base("another_base")
    assert severities(check(model, base=other, verbose=False), "another_base is not inside") == ["problem"]

    # eight validation images that are training images: found, counted
    leaked = check(model, train, train.take(1), verbose=False)
    assert any(f.severity == "problem" and f.message.startswith("8 of 8 validation images") for f in leaked)
    # TF's tutorial splits a reshuffling dataset with take/skip: the membership changes every pass
    tutorial_val = val.skip(1)
    assert severities(check(model, train, tutorial_val, verbose=False), "take()/skip()") == ["problem"]
    assert severities(check(model, train, val, verbose=False), "take()/skip()") == []


@pytest.mark.slow
def test_the_probe_leaves_no_trace_and_agrees_with_a_real_fit():
    probe_module._CACHE.clear()
    keras.utils.set_random_seed(3)
    expected = keras.layers.Dense(3)
    expected.build((None, 2))
    keras.utils.set_random_seed(3)
    seeded = (random.getstate(), np.random.get_state()[1].copy())
    behaviour = probe()
    assert random.getstate() == seeded[0]
    np.testing.assert_array_equal(np.random.get_state()[1], seeded[1])
    drawn = keras.layers.Dense(3)
    drawn.build((None, 2))
    np.testing.assert_array_equal(drawn.kernel.numpy(), expected.kernel.numpy())  # no global draw taken

    # another model, fitted for real: a convolutional base with BatchNorm, called with training=False
    fresh_start()
    base = tiny_base()
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, layers.Dense(1)(layers.GlobalAveragePooling2D()(base(inputs, training=False))))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.random.default_rng(0).uniform(0, 1, (8, SIZE, SIZE, 3)).astype("float32")
    bn = base.layers[2]
    before = np.array(bn.moving_mean.numpy())
    model.fit(x, np.zeros((8, 1)), epochs=1, batch_size=8, verbose=0)
    assert behaviour.training_false_keeps_bn_frozen == np.array_equal(bn.moving_mean.numpy(), before)

    # and a Dropout after a call given training=False: fit's loss with the weights held still (SGD at rate
    # 0) against the inference loss
    fresh_start()
    inner_inputs, outer_inputs = keras.Input((SIZE, SIZE, 3)), keras.Input((SIZE, SIZE, 3))
    inner = keras.Model(inner_inputs, layers.GlobalAveragePooling2D()(inner_inputs))
    head = layers.Dense(1, kernel_initializer="ones")
    outer = keras.Model(outer_inputs, head(layers.Dropout(0.5, seed=2)(inner(outer_inputs, training=False))))
    outer.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    target = np.asarray(outer(x, training=False))
    fit_loss = outer.fit(x, target, epochs=1, batch_size=8, verbose=0).history["loss"][0]
    assert behaviour.dropout_after_training_false_active == (fit_loss > 0.0)

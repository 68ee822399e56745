"""What the Keras installed here does with ``training=False`` during ``fit``, measured on tiny models.

Keras changed its answer between versions (docs/stack-facts.md): tf.keras 2 honoured a
``base(x, training=False)`` given at functional construction, Keras 3 up to 3.15 lets ``fit``'s
``training=True`` override it (an unfrozen BatchNorm inside such a base normalises with batch statistics
and moves its moving statistics), and the next Keras lets the construction-time flag win again, so that a
``Dropout`` placed after such a call stops dropping during ``fit``. Nothing here is hard-coded: ``probe()``
fits three tiny models for one step each and reports what happened. Its models use fixed seeds and
constant initialisers and draw nothing from the global random state, so a probe changes no later draw;
its answer is cached per Keras module.

It runs under Keras 3 and under tf-keras 2 (``probe(tf.keras)`` with ``TF_USE_LEGACY_KERAS=1``)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from types import ModuleType

import numpy as np

_CACHE: dict[str, KerasBehaviour] = {}


@dataclass(frozen=True)
class KerasBehaviour:
    """The probe's measurements (see ``probe``)."""

    keras_version: str
    # an unfrozen BatchNormalization inside a base called as base(x, training=False): how far one step of
    # fit moved its moving mean (momentum 0.5, batch mean 3: 1.5 when fit's training=True wins)
    bn_moving_mean_change: float
    # the same with the BatchNormalization set trainable=False
    frozen_bn_moving_mean_change: float
    # a Dropout(0.9) placed after base(x, training=False): fit's loss vs the inference loss (0 when off)
    dropout_fit_loss: float
    dropout_inference_loss: float
    # a RandomFlip in a model called bare, model(x): whether any of 16 calls changed the image
    bare_call_augments: bool

    @property
    def training_false_keeps_bn_frozen(self) -> bool:
        """Whether ``base(x, training=False)`` keeps an unfrozen BatchNorm in inference mode during fit."""
        return self.bn_moving_mean_change == 0.0

    @property
    def dropout_after_training_false_active(self) -> bool:
        """Whether a Dropout placed after a ``base(x, training=False)`` call drops during fit."""
        return self.dropout_fit_loss != self.dropout_inference_loss

    @property
    def fit_flag_reaches_every_layer(self) -> bool:
        """Whether ``fit``'s training=True reaches every layer, flags given at construction included
        (Keras 3 up to 3.15): then each part of a model can be run with an explicit flag, as fit runs it."""
        return not self.training_false_keeps_bn_frozen and self.dropout_after_training_false_active

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "training_false_keeps_bn_frozen": self.training_false_keeps_bn_frozen,
            "dropout_after_training_false_active": self.dropout_after_training_false_active,
        }

    def sentence(self) -> str:
        """The answer in one line, with the numbers."""
        bn = "keeps" if self.training_false_keeps_bn_frozen else "does NOT keep"
        drop = "still drops" if self.dropout_after_training_false_active else "is OFF"
        return (
            f"Keras {self.keras_version}: base(x, training=False) {bn} an unfrozen BatchNorm in inference mode "
            f"during fit (moving mean moved {self.bn_moving_mean_change:g} in one step; "
            f"{self.frozen_bn_moving_mean_change:g} with trainable=False), and a Dropout after that call {drop} "
            f"during fit (fit loss {self.dropout_fit_loss:g}, inference loss {self.dropout_inference_loss:g})"
        )


def _default_keras() -> ModuleType:
    import keras

    return keras


def _version(k: ModuleType) -> str:
    """The Keras version of a module (``tf.keras`` under tf-keras 2 keeps it on its distribution only)."""
    version = getattr(k, "__version__", None)
    if version:
        return str(version)
    from importlib import metadata

    top = k.__name__.split(".")[0]
    try:
        return metadata.version(top.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "unknown"


def probe(keras_module: ModuleType | None = None) -> KerasBehaviour:
    """Measure what ``keras_module`` (default: ``keras``; pass ``tf.keras`` for tf-keras 2) does during
    ``fit`` with ``training=False``, once per process and module."""
    k = keras_module or _default_keras()
    key = f"{k.__name__}:{_version(k)}"
    if key not in _CACHE:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            _CACHE[key] = _measure(k)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
    return _CACHE[key]


def _fit_one_step(k, model, x, y) -> float:
    model.compile(optimizer=k.optimizers.SGD(0.0, name="probe_sgd"), loss="mse", run_eagerly=True)
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return float(history.history["loss"][-1])


def _bn_change(k, trainable: bool) -> float:
    layers = k.layers
    inner_in = k.Input((4,), name="probe_bn_inner_input")
    bn = layers.BatchNormalization(momentum=0.5, name="probe_bn")
    base = k.Model(inner_in, bn(inner_in), name="probe_bn_base")
    bn.trainable = trainable
    x_in = k.Input((4,), name="probe_bn_input")
    head = layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros", name="probe_bn_head")
    model = k.Model(x_in, head(base(x_in, training=False)), name="probe_bn_model")
    x = np.full((8, 4), 3.0, dtype="float32")
    before = np.array(bn.moving_mean.numpy(), copy=True)
    _fit_one_step(k, model, x, np.zeros((8, 1), dtype="float32"))
    return float(np.max(np.abs(bn.moving_mean.numpy() - before)))


def _dropout_losses(k) -> tuple[float, float]:
    layers = k.layers
    inner_in = k.Input((4,), name="probe_dropout_inner_input")
    base = k.Model(inner_in, layers.Activation("linear", name="probe_linear")(inner_in), name="probe_dropout_base")
    x_in = k.Input((4,), name="probe_dropout_input")
    x = layers.Dropout(0.9, seed=1, name="probe_dropout")(base(x_in, training=False))
    head = layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros", name="probe_dropout_head")
    model = k.Model(x_in, head(x), name="probe_dropout_model")
    ones = np.ones((8, 4), dtype="float32")
    target = np.full((8, 1), 4.0, dtype="float32")  # the inference output: dropout off, 4 ones summed
    fit_loss = _fit_one_step(k, model, ones, target)
    inference_loss = float(np.mean((np.asarray(model(ones, training=False)) - target) ** 2))
    return fit_loss, inference_loss


def _bare_call_augments(k) -> bool:
    image_in = k.Input((2, 2, 1), name="probe_flip_input")
    flip = k.Sequential([k.layers.RandomFlip("horizontal_and_vertical", seed=1, name="probe_flip")], name="probe_aug")
    model = k.Model(image_in, flip(image_in), name="probe_flip_model")
    image = np.arange(4, dtype="float32").reshape(1, 2, 2, 1)
    return any(not np.array_equal(np.asarray(model(image)), image) for _ in range(16))


def _measure(k) -> KerasBehaviour:
    fit_loss, inference_loss = _dropout_losses(k)
    return KerasBehaviour(
        keras_version=_version(k),
        bn_moving_mean_change=_bn_change(k, trainable=True),
        frozen_bn_moving_mean_change=_bn_change(k, trainable=False),
        dropout_fit_loss=fit_loss,
        dropout_inference_loss=inference_loss,
        bare_call_augments=_bare_call_augments(k),
    )

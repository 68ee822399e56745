"""Walking a Keras model: its layers (nested models included), which of them draw random numbers in
training mode, which normalise with batch statistics, and the state a forward pass can write.

Every part of the measurement finds what it needs here, on any model: the suite's classifier, the course's
``alpaca_model``, a ``Sequential``."""

from __future__ import annotations

import keras
import numpy as np

# Layers that draw random numbers in training mode and are off in inference mode: regularisation.
# (EfficientNet's stochastic depth is a Dropout with a noise shape.)
DROPOUT_LAYERS = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


def walk_layers(layer: keras.layers.Layer):
    """Every layer inside ``layer`` (depth first), nested models included."""
    for child in getattr(layer, "layers", []):
        yield child
        yield from walk_layers(child)


def seed_states(layer: keras.layers.Layer) -> list:
    """The seed-generator states of ``layer`` and everything inside it: what its random draws read."""
    return [v for v in getattr(layer, "variables", []) if "seed_generator_state" in v.path]


def is_dropout(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, DROPOUT_LAYERS)


def is_augmentation(layer: keras.layers.Layer) -> bool:
    """A random layer that is not regularisation: Keras's random preprocessing layers (RandomFlip,
    RandomRotation, RandomZoom, ...), which act in training mode only, recognised by their seed state."""
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        return False
    return not is_dropout(layer) and bool(seed_states(layer))


def has_random_layers(layer: keras.layers.Layer) -> bool:
    """Whether a training-mode pass draws dropout or noise inside ``layer`` (e.g. EfficientNet's
    stochastic-depth dropout; MobileNetV2 has none). Freezing does not switch these off."""
    return any(is_dropout(child) for child in walk_layers(layer))


def augmentation_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    return [child for child in walk_layers(layer) if is_augmentation(child)]


def dropout_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    return [child for child in walk_layers(layer) if is_dropout(child)]


def batchnorm_layers(layer: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    return [child for child in walk_layers(layer) if isinstance(child, keras.layers.BatchNormalization)]


def copy_values(variables) -> list[np.ndarray]:
    """Copies of the variables' current values (to restore them, compare them or store them)."""
    return [np.array(v.numpy(), copy=True) for v in variables]


def assign_values(variables, values: list[np.ndarray]) -> None:
    """Put values saved by ``copy_values`` back into the same variables."""
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def moving_statistics(model: keras.layers.Layer) -> list:
    """Every BN's moving mean and variance: what a trainable BN writes in training mode."""
    return [v for bn in batchnorm_layers(model) for v in (bn.moving_mean, bn.moving_variance)]


def forward_state(model: keras.Model) -> list:
    """The variables a forward pass can write: the BN moving statistics and every random layer's seed
    state. Weights change only through an optimizer, so restoring these undoes any pass, at 107 of the
    265 variables of a MobileNetV2 classifier."""
    return moving_statistics(model) + seed_states(model)

"""The augmentation block (config group ``augment``). Keras's random layers act only in training mode,
so ``evaluate``/``predict`` never augment (docs/stack-facts.md K6)."""

from __future__ import annotations

import keras

from ..config import AugmentConfig


def build_augmentation(cfg: AugmentConfig, seed: int) -> keras.Sequential:
    """A Sequential of random layers; empty (identity) for ``augment=none``. Seeded for determinism."""
    layers: list[keras.layers.Layer] = []
    if cfg.flip:
        layers.append(keras.layers.RandomFlip(cfg.flip, seed=seed))
    if cfg.rotation:
        layers.append(keras.layers.RandomRotation(cfg.rotation, seed=seed + 1))
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, seed=seed + 2))
    if cfg.translation:
        layers.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation, seed=seed + 3))
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, seed=seed + 4))
    # Keras cannot build an empty Sequential; Identity keeps the model's shape the same for augment=none.
    return keras.Sequential(layers or [keras.layers.Identity(name="no_augmentation")], name="augmentation")


def augments(block: keras.Sequential) -> bool:
    """Whether the block changes images at all (False for ``augment=none``)."""
    return any(not isinstance(layer, keras.layers.Identity) for layer in block.layers)

"""The gap measurement and the fine-tuning check, for any Keras model.

``ablate`` and a notebook use the same public surface::

    from finetune_ablation.gap import GapCallback, check
    check(model)                                  # the three questions, for this model, one line each
    gap = GapCallback(train_data=train_dataset)
    model.fit(train_dataset, validation_data=validation_dataset, epochs=5, callbacks=[gap])
    gap.summary(); gap.plot()

Modules: ``callback`` (GapCallback), ``meter`` and ``passes`` (the staged measuring passes, traced once
per model), ``whole`` (whole-model passes, for any model), ``parts`` (the model's stages, found by walking
its graph), ``layers`` (walking a model), ``data`` (reading a split without moving fit's shuffle),
``scoring`` (the compiled accuracy and loss), ``decomposition`` (components and intervals), ``sentence``
and ``plot`` (the answer in words and as a figure), ``keras_probe`` (what this Keras does with
``training=False``), ``checks`` (check). Imports neither Hydra nor MLflow. See docs/notebook.md."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .callback import GapCallback
    from .checks import Finding, check
    from .keras_probe import KerasBehaviour, probe

__all__ = ["Finding", "GapCallback", "KerasBehaviour", "check", "probe"]
_HOMES = {
    "GapCallback": "callback",
    "check": "checks",
    "Finding": "checks",
    "probe": "keras_probe",
    "KerasBehaviour": "keras_probe",
}


def __getattr__(name: str):
    """Public names load on first use: ``gap.decomposition`` alone needs no TensorFlow."""
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

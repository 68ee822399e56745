"""The gap measurement, for any Keras model: why validation beats training, measured per epoch.

``ablate`` and a notebook use the same public surface::

    from finetune_ablation.gap import GapCallback
    gap = GapCallback(train_data=train_dataset)
    model.fit(train_dataset, validation_data=validation_dataset, epochs=5, callbacks=[gap])

Modules: ``callback`` (GapCallback), ``meter`` and ``passes`` (the measuring passes, traced once per
model), ``parts`` (the model's stages, found by walking its graph), ``layers`` (walking a model),
``scoring`` (the compiled accuracy and loss), ``decomposition`` (components and intervals), ``sentence``
and ``plot`` (the answer in words and as a figure). Imports neither Hydra nor MLflow. See docs/notebook.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .callback import GapCallback

__all__ = ["GapCallback"]


def __getattr__(name: str):
    """Public names load on first use: ``gap.decomposition`` alone needs no TensorFlow."""
    if name == "GapCallback":
        from .callback import GapCallback

        return GapCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

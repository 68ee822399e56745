"""Where the training reports what it measured: a small ``Recorder`` interface (per epoch, per phase,
params, tags, artifacts, the model) and ``MlflowRecorder``, its implementation into the active MLflow run.

The training (train.py) calls only this interface, with the names of the run record (record.py), so it
reads as config -> data -> model -> phase 1 -> phase 2 -> record. Per-epoch rows are logged as each
epoch ends: the MLflow UI shows a live run, and an Optuna pruner reads the same epochs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import record as rec

if TYPE_CHECKING:
    from collections.abc import Sequence

    import keras
    import pandas as pd
    from matplotlib.figure import Figure

    from .split_datasets import SplitDataset


class Recorder(Protocol):
    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics, at the global epoch as step (phase 2 continues phase 1's numbering)."""

    def phase(self, phase: int, metrics: dict[str, float], report: str) -> None:
        """A phase's summary metrics and its trainable-weights report."""

    def metrics(self, metrics: dict[str, float]) -> None:
        """Metrics logged once (no step)."""

    def params(self, params: dict[str, Any]) -> None: ...

    def tags(self, tags: dict[str, str]) -> None: ...

    def text(self, text: str, name: str) -> None: ...

    def figure(self, figure: Figure, name: str) -> None:
        """A figure as an image artifact; the figure is closed afterwards."""

    def table(self, frame: pd.DataFrame, name: str) -> None:
        """A table as a CSV artifact."""

    def model(self, model: keras.Model) -> None:
        """The final model, loadable again."""

    def datasets(self, splits: list[SplitDataset]) -> None:
        """The data the run trained and validated on, described (never copied)."""

    def description(self, markdown: str, figures: Sequence[str] = ()) -> None:
        """The run's finding, shown first on its page; ``figures`` (logged artifacts) below it."""


class MlflowRecorder:
    """``Recorder`` into the active MLflow run."""

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def phase(self, phase: int, metrics: dict[str, float], report: str) -> None:
        import mlflow

        mlflow.log_metrics({rec.phase_metric(phase, k): v for k, v in metrics.items()})
        mlflow.log_text(report, rec.trainable_report_artifact(phase))

    def metrics(self, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(metrics)

    def params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params(params)

    def tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def text(self, text: str, name: str) -> None:
        import mlflow

        mlflow.log_text(text, name)

    def figure(self, figure: Figure, name: str) -> None:
        import matplotlib.pyplot as plt
        import mlflow

        mlflow.log_figure(figure, name)
        plt.close(figure)

    def table(self, frame: pd.DataFrame, name: str) -> None:
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            frame.to_csv(path, index=False)
            mlflow.log_artifact(str(path))

    def datasets(self, splits: list[SplitDataset]) -> None:
        from .split_datasets import log_split_datasets

        log_split_datasets(splits)

    def description(self, markdown: str, figures: Sequence[str] = ()) -> None:
        import mlflow

        from ..descriptions import with_figures

        mlflow.set_tag(rec.DESCRIPTION_TAG, with_figures(markdown, mlflow.active_run().info.run_id, figures))

    def model(self, model: keras.Model) -> None:
        """MLflow's Keras flavor, loadable from ``runs:/<run id>/model`` by plain ``mlflow.keras.load_model`` or
        ``mlflow.pyfunc.load_model`` in any Python with Keras: the model holds only Keras's own layers
        (model.preprocessing_layer). Requirements are pinned from this environment: MLflow's inference would
        re-import the model in a subprocess."""
        from importlib.metadata import version

        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        pins = [f"{name}=={version(name)}" for name in ("tensorflow", "keras")]
        float32 = np.dtype("float32")
        signature = ModelSignature(  # images in (pixels 0..255), logits out: shown in the UI, checked on serving
            inputs=Schema([TensorSpec(float32, (-1, *model.input_shape[1:]), "image")]),
            outputs=Schema([TensorSpec(float32, (-1, *model.output_shape[1:]), "logits")]),
        )
        mlflow.keras.log_model(model, name=rec.MODEL_ARTIFACT, pip_requirements=pins, signature=signature)
        run_id = mlflow.active_run().info.run_id
        mlflow.set_tag(rec.MODEL_URI_TAG, f"runs:/{run_id}/{rec.MODEL_ARTIFACT}")

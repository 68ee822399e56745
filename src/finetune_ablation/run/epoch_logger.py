"""Per-epoch recording for a two-phase run. Keras's own autologgers restart steps on the second
``fit()`` (docs/stack-facts.md), so this callback records every metric with the global epoch as step,
keeps the rows for ``history.csv`` and prints the console's one short line per epoch."""

from __future__ import annotations

import keras

from .. import record as rec
from ..console import print_epoch
from .recorder import Recorder


def _current_learning_rate(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class EpochLogger(keras.callbacks.Callback):
    def __init__(self, phase: int, rows: list[dict], recorder: Recorder):
        super().__init__()
        self.phase = phase
        self.rows = rows
        self.recorder = recorder

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        metrics.setdefault(rec.LEARNING_RATE, _current_learning_rate(self.model))
        self.recorder.epoch(epoch, metrics)
        self.rows.append({"epoch": epoch, "phase": self.phase, **metrics})
        print_epoch(self.phase, epoch, int(self.params.get("epochs") or epoch + 1), metrics)

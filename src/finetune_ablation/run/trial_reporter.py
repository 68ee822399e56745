"""The Keras side of an Optuna trial: report ``val_accuracy`` after every fine-tune epoch and stop when the
pruner says so (``optuna_trial.trial_callbacks`` builds it for a job of an Optuna sweep)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import keras
import mlflow

from hydra_plugins.finetune_ablation_optuna_sweeper.handoff import MLFLOW_RUN_USER_ATTR, PRUNED_USER_ATTR

from .. import record as rec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

REPORTED_METRIC = rec.VAL_ACCURACY


class TrialReporter(keras.callbacks.Callback):
    """Reports ``val_accuracy`` of every epoch from ``first_epoch`` on (phase 2) and stops when pruned.

    A storage error while reporting is logged and ends the reporting, never the training: the run's
    result is still valid, only its pruning is lost."""

    def __init__(self, trial: optuna.trial.Trial, first_epoch: int):
        super().__init__()
        self.trial = trial
        self.first_epoch = first_epoch
        self.pruned_at: int | None = None
        self._active = True

    def on_train_begin(self, logs: dict | None = None) -> None:
        run = mlflow.active_run()
        if run is not None and self._active:
            self._call(self.trial.set_user_attr, MLFLOW_RUN_USER_ATTR, run.info.run_id)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(REPORTED_METRIC)
        if epoch < self.first_epoch or value is None or not self._active:
            return
        self._call(self.trial.report, float(value), epoch)
        if self._active and self._call(self.trial.should_prune):
            self._prune(epoch)

    def _prune(self, epoch: int) -> None:
        self.pruned_at = epoch
        self.model.stop_training = True
        self._call(self.trial.set_user_attr, PRUNED_USER_ATTR, epoch)
        _tag({rec.PRUNED_TAG: rec.TRUE, rec.OPTUNA_PRUNED_AT_TAG: str(epoch)})
        log.info("Optuna trial %d pruned after epoch %d", self.trial.number, epoch)

    def _call(self, method, *args):
        try:
            return method(*args)
        except Exception as exc:
            self._active = False
            name = getattr(method, "__name__", method)
            log.warning("Optuna trial %d: %s failed, reporting stops: %s", self.trial.number, name, exc)
            _tag({rec.OPTUNA_REPORT_ERROR_TAG: f"{type(exc).__name__}: {exc}"[: rec.MAX_PARAM_LENGTH]})
            return None


def _tag(tags: dict[str, str]) -> None:
    """Tag the active MLflow run (never start one: the job's run is the only place for these)."""
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)

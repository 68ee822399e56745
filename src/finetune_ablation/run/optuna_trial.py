"""Job side of an Optuna sweep: report val_accuracy to this job's trial and stop when it is pruned.

The suite's sweeper (``hydra/sweeper=optuna``) hands each job its trial in ``cfg.optuna`` (study name,
storage, trial number, pruner). The job reports the validation accuracy after every fine-tune (phase 2)
epoch, with the epoch as step (the same step as in MLflow), and asks the pruner; when told to prune it
stops training after that epoch, tags the MLflow run ``pruned=true`` and leaves ``pruned_at_epoch`` on
the trial. The sweeper then tells Optuna PRUNED: only the sweeper ends trials, the job only reports.

Outside a sweep (``cfg.optuna`` null) none of this runs."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import keras
import mlflow
from omegaconf import DictConfig

from hydra_plugins.finetune_ablation_optuna_sweeper.handoff import (
    MLFLOW_RUN_USER_ATTR,
    PRUNED_USER_ATTR,
    TrialHandoff,
    open_storage,
)

from .. import record as rec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

REPORTED_METRIC = rec.VAL_ACCURACY


def _handoff(cfg: DictConfig) -> TrialHandoff | None:
    return TrialHandoff.from_config(cfg.get("optuna"))


def trial_tags(cfg: DictConfig) -> dict[str, str]:
    """MLflow tags linking the run to its Optuna trial (none outside a sweep)."""
    handoff = _handoff(cfg)
    if handoff is None:
        return {}
    return {rec.OPTUNA_STUDY_TAG: handoff.study_name, rec.OPTUNA_TRIAL_TAG: str(handoff.trial_number)}


def trial_callbacks(cfg: DictConfig) -> list[keras.callbacks.Callback]:
    """``[TrialReporter]`` for a job of an Optuna sweep, else ``[]`` (for ``train_and_log``)."""
    handoff = _handoff(cfg)
    if handoff is None:
        return []
    return [TrialReporter(open_trial(handoff), first_epoch=cfg.train.initial_epochs)]


@functools.cache
def _storage(url: str):
    """One storage per process: a launcher that reuses its worker runs many trials there."""
    return open_storage(url)


def open_trial(handoff: TrialHandoff) -> optuna.trial.Trial:
    """The running ``optuna.trial.Trial``, loaded in this process with the sweep's pruner."""
    import optuna
    from hydra.utils import instantiate

    storage = _storage(handoff.storage)
    pruner = instantiate(handoff.pruner) if handoff.pruner else optuna.pruners.NopPruner()
    # The job never samples; a RandomSampler keeps Trial() from touching any sampler state.
    study = optuna.load_study(
        study_name=handoff.study_name, storage=storage, sampler=optuna.samplers.RandomSampler(), pruner=pruner
    )
    study_id = storage.get_study_id_from_name(handoff.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, handoff.trial_number)
    return optuna.trial.Trial(study, trial_id)


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

"""Job side of an Optuna sweep: report val_accuracy to this job's trial and stop when it is pruned.

The suite's sweeper (``hydra/sweeper=optuna``) hands each job its trial in ``cfg.optuna`` (study name,
storage, trial number, pruner). The job reports the validation accuracy after every fine-tune (phase 2)
epoch, with the epoch as step (the same step as in MLflow), and asks the pruner; when told to prune it
stops training after that epoch, tags the MLflow run ``pruned=true`` and leaves ``pruned_at_epoch`` on
the trial. The sweeper then tells Optuna PRUNED: only the sweeper ends trials, the job only reports.

Outside a sweep (``cfg.optuna`` null) none of this runs. This module imports neither Keras nor TensorFlow:
a job reads its trial's tags before it knows whether it trains at all (``resume``); the Keras callback is
``trial_reporter.TrialReporter``."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from hydra_plugins.finetune_ablation_optuna_sweeper.handoff import TrialHandoff, open_storage

from .. import record as rec

if TYPE_CHECKING:
    import keras
    import optuna


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
    from .trial_reporter import TrialReporter  # Keras: only in a job that trains

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

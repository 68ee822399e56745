"""The one door of the Optuna sweeper plugin (``hydra_plugins.finetune_ablation_optuna_sweeper``) into
the app: the plugin imports this module and nothing else of ``finetune_ablation``, so the app's layout
can change without touching the plugin. Imports are lazy: Hydra imports the plugin on every start-up."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import record

if TYPE_CHECKING:
    import mlflow
    from omegaconf import DictConfig

__all__ = ["config_hash", "optuna_storage_dir", "parent_run", "record"]


def config_hash(cfg: DictConfig) -> str:
    """The suite's identity of what a job computes (``tracking.config_hash``)."""
    from .tracking import config_hash as hash_of

    return hash_of(cfg)


def optuna_storage_dir() -> Path:
    """Where the default Optuna storage lives: beside the suite's MLflow store (``mlruns/``)."""
    from .paths import MLRUNS_DIR

    return MLRUNS_DIR


def parent_run(config: DictConfig) -> tuple[mlflow.MlflowClient, str] | None:
    """A client and the id of this multirun's MLflow parent run (the app's multirun grouping), or None
    outside the suite's config or without a parent run."""
    from omegaconf import OmegaConf

    if OmegaConf.select(config, "tracking") is None:
        return None
    import mlflow

    from .run.parent_run import find_parent_run, sweep_dir_of
    from .tracking import resolve_uri

    client = mlflow.MlflowClient(resolve_uri(config.tracking))
    experiment: Any = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    parent = find_parent_run(client, experiment.experiment_id, sweep_dir_of(config))
    return None if parent is None else (client, parent.info.run_id)

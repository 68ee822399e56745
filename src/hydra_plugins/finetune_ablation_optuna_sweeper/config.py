"""Config of the sweeper, registered in Hydra's ConfigStore as ``hydra/sweeper: optuna``.

Mirrors the PyPI hydra-optuna-sweeper's layout, so users' configs carry over: ``hydra.sweeper.params``,
``direction``, ``n_trials``, ``n_jobs``, ``storage``, ``study_name``, ``max_failure_rate``, and the
option groups ``hydra/sweeper/sampler`` (tpe, random, grid, cmaes if the ``cmaes`` package is
installed) and ``hydra/sweeper/pruner`` (median, hyperband, threshold, none). Sampler and pruner nodes
are ``_target_`` configs, so ``hydra.sweeper.sampler.seed=1`` or any constructor argument can be set."""

import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "finetune_ablation_optuna_sweeper"


class Direction(Enum):
    minimize = 1
    maximize = 2


@dataclass
class SamplerConfig:
    _target_: str = MISSING
    seed: int | None = None  # give each distributed worker its own seed (or none): same seed, same points


@dataclass
class TPESamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    constant_liar: bool = True  # parallel and distributed workers avoid suggesting the same point


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConfig(SamplerConfig):
    """The grid is built from ``params`` (choice / range / int(interval)); n_trials is capped at its size."""

    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.CmaEsSampler"
    n_startup_trials: int = 1
    sigma0: float | None = None
    consider_pruned_trials: bool = False
    restart_strategy: str | None = None
    use_separable_cma: bool = False


@dataclass
class MedianPrunerConfig:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that finish before anything is pruned
    n_warmup_steps: int = 0  # steps are epochs (the MLflow step): prune no trial before this epoch
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # int or "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class ThresholdPrunerConfig:
    """Prunes a trial whose reported val_accuracy is below ``lower`` (or above ``upper``)."""

    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class NopPrunerConfig:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.finetune_ablation_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # The sweeper builds the sampler itself (the grid sampler needs the search space) and hands the
    # pruner's config to every job, so Hydra must not instantiate these nodes.
    _recursive_: bool = False
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    # ablate returns the final val_accuracy, hence maximize (the PyPI plugin defaults to minimize).
    direction: Direction = Direction.maximize
    # null: sqlite:///<project>/mlruns/optuna.db. Any SQLAlchemy URL (postgresql://, mysql://) shares
    # one study between workers; a relative sqlite path is made absolute from the launching directory.
    storage: str | None = None
    # null: <tracking.experiment>-<hash of the fixed config and the search space>
    study_name: str | None = None
    n_trials: int = 20  # TOTAL complete + pruned trials wanted in the study, over every launch and worker
    n_jobs: int = 1  # trials launched together per batch (set it to the launcher's parallelism)
    # Stop with an error once failed / launched (in this launch) exceeds this. A failed trial does not
    # count toward n_trials, so it is replaced; at most n_trials failures per launch.
    max_failure_rate: float = 0.0
    # The search space, in the sweep grammar: interval(a,b), tag(log, interval(a,b)),
    # int(interval(a,b)), choice(...), range(...); a plain value is fixed for every trial.
    params: dict[str, Any] | None = None
    # A worker killed without a chance to clean up leaves RUNNING trials; once their heartbeat is
    # older than 5x this many seconds, the next sweeper marks them FAIL and replaces them.
    heartbeat_interval: int = 60


def _store() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider=PROVIDER)
    samplers: dict[str, type] = {
        "tpe": TPESamplerConfig,
        "random": RandomSamplerConfig,
        "grid": GridSamplerConfig,
    }
    if importlib.util.find_spec("cmaes") is not None:  # Optuna's CmaEsSampler needs the cmaes package
        samplers["cmaes"] = CmaEsSamplerConfig
    for name, node in samplers.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)
    pruners = {
        "median": MedianPrunerConfig,
        "hyperband": HyperbandPrunerConfig,
        "threshold": ThresholdPrunerConfig,
        "none": NopPrunerConfig,
    }
    for name, node in pruners.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)


_store()

"""The Sweeper class Hydra instantiates for ``hydra/sweeper=optuna``.

A thin shell: Hydra imports this module on every start-up while scanning plugins, so Optuna and the
sweep logic (``_impl``) are imported only when a sweep is really set up."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Hydra Sweeper on Optuna >= 4 with total ``n_trials``, shared storage and pruning jobs."""

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        heartbeat_interval: int,
    ) -> None:
        from ._impl import OptunaSweeperImpl, SweepSettings

        self.sweeper = OptunaSweeperImpl(
            SweepSettings(
                sampler=sampler,
                pruner=pruner,
                direction=direction,
                storage=storage,
                study_name=study_name,
                n_trials=n_trials,
                n_jobs=n_jobs,
                max_failure_rate=max_failure_rate,
                params=params,
                heartbeat_interval=heartbeat_interval,
            )
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)

"""The sweep loop: ask a batch of trials, launch them through the configured Hydra launcher, tell the
results, until the study holds ``n_trials`` complete + pruned trials (see ``_study`` for the counting).

Jobs report intermediate values themselves (``finetune_ablation.run.trial_reporter``); the sweeper alone tells
Optuna how each trial ended: COMPLETE with the job's return value, PRUNED when the job stopped on the
pruner's word (it leaves the user attr ``pruned_at_epoch``), FAIL when the job failed or returned no
finite number."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import Trial, TrialState

from . import _results, _study
from ._search_space import SearchSpace, grid_values, parse_search_space, short_hash
from .handoff import PRUNED_USER_ATTR, TrialHandoff, open_storage

log = logging.getLogger(__name__)


class SweepSettingsError(CompactHydraException):
    """A sweep that cannot start (bad search space, storage or direction): Hydra prints only the message."""


@dataclass
class SweepSettings:
    """``hydra.sweeper.*`` as configured (see ``config.OptunaSweeperConf`` for each key's meaning)."""

    sampler: Any
    pruner: Any
    direction: Any
    storage: str | None
    study_name: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    params: Any
    heartbeat_interval: int

    def check(self) -> None:
        for key, ok in (
            ("n_trials", self.n_trials >= 1),
            ("n_jobs", self.n_jobs >= 1),
            ("max_failure_rate", 0.0 <= self.max_failure_rate <= 1.0),
            ("heartbeat_interval", self.heartbeat_interval >= 1),
        ):
            if not ok:
                raise ValueError(f"hydra.sweeper.{key}={getattr(self, key)} is out of range")

    def direction_name(self) -> str:
        if OmegaConf.is_list(self.direction) or isinstance(self.direction, (list, tuple)):
            raise ValueError("hydra.sweeper.direction: one direction only (the job returns one value)")
        return str(getattr(self.direction, "name", self.direction)).lower()


@dataclass
class _Run:
    """One sweep's working state."""

    study: optuna.Study
    storage_url: str
    space: SearchSpace
    total: int
    pruner: dict[str, Any]
    heartbeat: _study.Heartbeat
    launched: int = 0  # trials launched by this sweeper in this launch
    failed: int = 0  # ... and told FAIL: the multirun's exit status counts them (finetune_ablation.run.parent_run)


class OptunaSweeperImpl(Sweeper):
    def __init__(self, settings: SweepSettings) -> None:
        settings.check()
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.job_idx = 0
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # -- the sweep ---------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        try:
            run = self._start(arguments)
        except ValueError as exc:  # a bad search space, storage or direction: one line, exit 2
            raise SweepSettingsError(str(exc)) from None
        with run.heartbeat:
            try:
                self._optimize(run)
            finally:
                self._report(run)

    def _start(self, arguments: list[str]) -> _Run:
        assert self.config is not None
        space = parse_search_space(self.settings.params, arguments)
        url = _study.absolute_storage_url(self.settings.storage)
        storage = open_storage(url, heartbeat_interval=self.settings.heartbeat_interval)
        sampler, total = self._sampler(space)
        name = self.settings.study_name or self._default_study_name(space)
        study = _study.open_study(storage, name, self.settings.direction_name(), sampler)
        study.set_user_attr("search_space", space.spec)
        pruner = OmegaConf.to_container(self.settings.pruner, resolve=True) if self.settings.pruner else {}
        heartbeat = _study.Heartbeat(storage, study, self.settings.heartbeat_interval)
        run = _Run(study, url, space, total, pruner, heartbeat)
        self._describe(run, sampler)
        return run

    def _optimize(self, run: _Run) -> None:
        while batch := self._ask_batch(run):
            run.failed += self._run_batch(run, batch)
            run.launched += len(batch)
            if self._too_many_failures(run.failed, run.launched, run.total):
                return
        if not run.launched:
            log.info("nothing to run: the study's trials already reach n_trials=%d", run.total)

    def _ask_batch(self, run: _Run) -> list[Trial]:
        """Up to n_jobs new trials, never taking the study past its total (see ``_study``)."""
        _study.fail_stale_trials(run.study)
        batch: list[Trial] = []
        for _ in range(self.settings.n_jobs):
            if len(_study.live_trials(run.study)) >= run.total:
                break
            trial = _study.ask(run.study, run.space.distributions)
            run.heartbeat.add(trial)
            if _study.is_surplus(run.study, trial, run.total):
                trial.set_user_attr(_study.SURPLUS_USER_ATTR, True)
                _study.tell(run.study, trial, TrialState.FAIL)
                run.heartbeat.discard([trial])
                log.info("trial %d not run: other workers reached n_trials=%d", trial.number, run.total)
                break
            batch.append(trial)
        return batch

    def _run_batch(self, run: _Run, batch: list[Trial]) -> int:
        """Launch one batch and tell its results; returns how many failed."""
        overrides = [self._job_overrides(run, trial) for trial in batch]
        try:
            self.validate_batch_is_legal(overrides)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        except BaseException:  # a config error, Ctrl-C: these trials will never report
            with contextlib.suppress(Exception):
                for trial in batch:
                    _study.tell(run.study, trial, TrialState.FAIL)
            raise
        self.job_idx += len(returns)
        failed = self._tell_batch(run, batch, returns)
        run.heartbeat.discard(batch)
        return failed

    def _job_overrides(self, run: _Run, trial: Trial) -> list[str]:
        handoff = TrialHandoff(run.study.study_name, run.storage_url, trial.number, run.pruner)
        return [
            *run.space.fixed,
            *run.space.overrides(trial.params),
            handoff.to_override(),
        ]

    def _tell_batch(self, run: _Run, batch: list[Trial], returns: list[JobReturn]) -> int:
        # The jobs wrote user attrs (pruned_at_epoch) from their own processes: read them fresh.
        running = run.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        attrs = {t.number: t.user_attrs for t in running}
        failed = 0
        for trial, ret in zip(batch, returns, strict=True):
            state, value = _outcome(trial, ret, attrs.get(trial.number, {}))
            _study.tell(run.study, trial, state, value)
            failed += state == TrialState.FAIL
            log.info("trial %d %s: value=%s params=%s", trial.number, state.name, value, trial.params)
        return failed

    def _too_many_failures(self, failed: int, launched: int, total: int) -> bool:
        """Logs why the sweep stops early. It returns instead of raising, so Hydra's end-of-multirun
        callbacks still close the MLflow parent run and make ``ablate`` exit 1 (the failed trials are
        tagged on it, ``_results.log_to_parent``)."""
        rate = self.settings.max_failure_rate
        if failed and failed / launched > rate:
            log.error(
                "error: %d of %d trials failed in this launch, more than hydra.sweeper.max_failure_rate=%s: "
                "the sweep stops (see the failed jobs' logs and MLflow runs)",
                failed,
                launched,
                rate,
            )
            return True
        if failed >= total:
            log.error("error: %d trials failed in this launch (n_trials=%d): the sweep stops", failed, total)
            return True
        return False

    def _report(self, run: _Run) -> None:
        """Results in the sweep dir and on the MLflow parent run; a reporting error is only logged."""
        assert self.config is not None
        try:
            results = _results.summarize(run.study, run.total, run.storage_url)
            files = _results.write_outputs(run.study, results, Path(self.config.hydra.sweep.dir))
            parent = _results.log_to_parent(self.config, results, files, run.launched, run.failed)
            log.info(
                "best value %s with %s (study %s%s)",
                results["best_value"],
                results["best_params"],
                run.study.study_name,
                f", MLflow parent run {parent}" if parent else "",
            )
        except Exception:
            log.exception("could not write the sweep's results")

    # -- set-up helpers ----------------------------------------------------------------------------

    def _sampler(self, space: SearchSpace) -> tuple[optuna.samplers.BaseSampler, int]:
        """The configured sampler and the total it can reach (a grid has only so many points)."""
        conf = self.settings.sampler
        if not str(conf.get("_target_", "")).endswith("GridSampler"):
            return instantiate(conf), self.settings.n_trials
        grid = {name: grid_values(name, d) for name, d in space.distributions.items()}
        size = math.prod(len(values) for values in grid.values())
        if size < self.settings.n_trials:
            log.info("the grid has %d points: n_trials %d -> %d", size, self.settings.n_trials, size)
        return instantiate(conf, search_space=grid), min(size, self.settings.n_trials)

    def _default_study_name(self, space: SearchSpace) -> str:
        """``<tracking.experiment>-<hash>``: the same fixed config and search space resume the same study."""
        assert self.config is not None
        prefix = OmegaConf.select(self.config, "tracking.experiment") or self.config.hydra.job.name
        return f"{prefix}-{short_hash(self._fixed_config_hash(space), space.fingerprint())}"

    def _fixed_config_hash(self, space: SearchSpace) -> str:
        """The suite's config hash (``sweeper_api.config_hash``: what a run computes, not where it is
        recorded) of the job config every trial shares: fixed overrides applied, searched keys removed."""
        from finetune_ablation.sweeper_api import config_hash

        assert self.hydra_context is not None and self.config is not None
        job = self.hydra_context.config_loader.load_sweep_config(self.config, list(space.fixed))
        without_hydra = OmegaConf.masked_copy(job, [key for key in job if key != "hydra"])
        container = OmegaConf.to_container(without_hydra, resolve=True, enum_to_str=True)
        assert isinstance(container, dict)
        for name in space.distributions:
            _drop(container, name.split("@")[0].split("."))
        return config_hash(OmegaConf.create(container))

    def _describe(self, run: _Run, sampler: optuna.samplers.BaseSampler) -> None:
        done = len(run.study.get_trials(deepcopy=False, states=_study.DONE))
        log.info(
            "Optuna study %s in %s: %s, sampler %s, pruner %s, %d of n_trials=%d complete or pruned",
            run.study.study_name,
            _study.printable_url(run.storage_url),
            run.study.direction.name.lower(),
            type(sampler).__name__,
            run.pruner.get("_target_", "none").rsplit(".", 1)[-1],
            done,
            run.total,
        )
        log.info("search space: %s", run.space.spec or "(nothing searched)")


def _outcome(trial: Trial, ret: JobReturn, user_attrs: dict[str, Any]) -> tuple[TrialState, float | None]:
    """How a trial ended, from its job's return and the attrs the job left on the trial."""
    try:
        value = ret.return_value  # re-raises the job's exception if it raised
    except Exception as exc:
        log.warning("trial %d: the job raised %s: %s", trial.number, type(exc).__name__, exc)
        return TrialState.FAIL, None
    try:
        number = float(value)
    except (TypeError, ValueError):
        log.warning("trial %d: the job returned %r, not a number", trial.number, value)
        return TrialState.FAIL, None
    if not math.isfinite(number):
        log.warning("trial %d: the job returned %s", trial.number, number)
        return TrialState.FAIL, None
    if PRUNED_USER_ATTR in user_attrs:
        return TrialState.PRUNED, number
    return TrialState.COMPLETE, number


def _drop(container: dict, path: list[str]) -> None:
    node: Any = container
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)

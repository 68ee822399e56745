"""One ``ablate`` job's lifecycle: connect to MLflow, open a run (a child of the sweep's parent in a
multirun), skip what resume finds done, train, and close the run FINISHED, FAILED or KILLED. The Hydra
app (``cli.py``) calls ``run_job`` once per job; ``ablate-reproduce`` calls it for its rerun."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .. import record as rec
from ..config import validate
from ..errors import UserError

if TYPE_CHECKING:  # mlflow is imported where a job runs, keeping --help and --cfg fast
    from collections.abc import Callable

    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger("finetune_ablation")


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _hydra_tags() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        rec.HYDRA_OVERRIDES_TAG: rec.format_overrides(list(hc.overrides.task)),
        rec.HYDRA_OUTPUT_DIR_TAG: str(hc.runtime.output_dir),
        rec.HYDRA_JOB_TAG: f"{hc.job.name}#{hc.job.num}" if _in_multirun() else hc.job.name,
    }


def _log_hydra_files() -> None:
    if HydraConfig.initialized():
        import mlflow

        hydra_dir = os.path.join(HydraConfig.get().runtime.output_dir, rec.HYDRA_DIR)
        if os.path.isdir(hydra_dir):
            mlflow.log_artifacts(hydra_dir, rec.HYDRA_DIR)


def _reuse(client: MlflowClient, done: Run, parent_id: str | None) -> float | None:
    """Resume: an identical FINISHED run exists (resume.decide), so train nothing and return its result."""
    if parent_id:
        client.set_tag(done.info.run_id, rec.REUSED_TAG, parent_id)
    return done.data.metrics.get(rec.VAL_ACCURACY)


def run_job(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> float | None:
    """One job: connect to MLflow, open a run, train, close the run FINISHED or FAILED.

    In a multirun the run is a child of the sweep's parent run, and with ``resume=true`` a config
    that already FINISHED is not trained again. A bad input prints one line and exits 2 in a single
    run; in a multirun it fails only this job (FAILED in MLflow, the sweep goes on) and returns None."""
    import mlflow

    from .. import console, liveness, reaper, tracking
    from ..run_names import run_name
    from ..threads import for_job
    from . import parent_run, resume

    cfg, threads = for_job(cfg)  # the count the engine granted: logged in the config, applied below
    try:
        uri = tracking.resolve_uri(cfg.tracking)
        client = tracking.connect(uri)
        experiment_id = tracking.ensure_experiment(client, uri, cfg.tracking.experiment)
    except UserError as exc:
        return _fail(exc)
    reaper.reap_once(client, uri)  # runs left RUNNING by killed processes become KILLED
    from .optuna_trial import trial_callbacks, trial_tags

    tags = {
        **resume.identity_tags(cfg),
        **_hydra_tags(),
        **(extra_tags or {}),
        **trial_tags(cfg),
        **liveness.process_tags(),
        rec.THREADS_GRANTED_TAG: threads.granted_by,
    }
    parent_id = None
    if _in_multirun():
        sweep_dir = str(Path(HydraConfig.get().sweep.dir).resolve())
        parent = parent_run.find_parent_run(client, experiment_id, sweep_dir)
        parent_id = parent.info.run_id if parent else None
        tags[rec.SWEEP_DIR_TAG] = sweep_dir
        if cfg.resume:
            decision = resume.decide(client, experiment_id, cfg, tags)
            if decision.reason:
                log.info(decision.reason)
            if decision.reuse is not None:
                return _reuse(client, decision.reuse, parent_id)
    mlflow.set_tracking_uri(uri)
    with (
        mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name(cfg, client, parent_id), tags=tags, parent_run_id=parent_id
        ) as run,
        liveness.heartbeat(uri, run.info.run_id),
    ):
        try:
            mlflow.log_params(tracking.config_params(cfg))
            _log_hydra_files()
            validate(cfg)
            _check_folder(cfg)
            train_and_log = _import_training(cfg.threads)
            result = train_and_log(cfg, extra_callbacks=trial_callbacks(cfg))
        except KeyboardInterrupt as exc:
            tracking.end_run_failed(exc, status="KILLED")
            raise
        except UserError as exc:
            tracking.end_run_failed(exc)
            return _fail(exc, run.info.run_id)
        except Exception as exc:
            tracking.end_run_failed(exc)
            if not _in_multirun():
                raise
            log.error("job failed (MLflow run %s):\n%s", run.info.run_id, traceback.format_exc())
            return None
    log.info("MLflow run %s finished: val_accuracy=%.4f (tracking URI %s)", run.info.run_id, result, uri)
    if not _in_multirun():  # a sweep prints its parent run at the end instead
        console.print_where_to_look(uri, experiment_id, run.info.run_id)
    return result


def _check_folder(cfg: DictConfig) -> None:
    """A missing data folder, fewer than two classes, an empty class, a file of another type or a split
    that leaves a class out is refused from the names alone, before the seconds of importing TensorFlow
    (generated images are made later)."""
    if not cfg.data.synthetic:
        from .image_files import check_folder

        check_folder(cfg.data.dir, cfg.data.validation_split, cfg.data.seed)


def _import_training(threads: int) -> Callable[..., float]:
    """Import TensorFlow, quietly, with its thread pools sized: only once a job is sure to train. A store
    that does not answer, a job resume skips and a value out of range never wait the seconds it takes."""
    from .. import console

    console.quiet_startup()  # before anything imports TensorFlow
    from ..threads import apply
    from .train import train_and_log

    apply(threads)
    return train_and_log


def _fail(exc: UserError, run_id: str | None = None) -> None:
    where = f" (MLflow run {run_id} marked FAILED)" if run_id else ""
    print(f"error: {exc}{where}", file=sys.stderr)
    if _in_multirun():
        return None
    sys.exit(2)

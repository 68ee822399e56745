"""``ablate``: the Hydra app. One job = one MLflow run; every Hydra override, ``--help``, ``--cfg job``
and ``-m`` multirun work as in any Hydra app. Studies in ``experiments/*.yaml`` are the ``experiment``
config group (global package), so ``ablate experiment=demo`` selects one."""

from __future__ import annotations

import logging
import os
import sys
import traceback

# TF's C++ start-up chatter hides the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import register_configs, validate
from .errors import UserError
from .paths import CONF_DIR, EXPERIMENTS_DIR

log = logging.getLogger("finetune_ablation")


def register_experiments() -> None:
    """Every ``experiments/NAME.yaml`` becomes the option ``experiment=NAME`` (package ``_global_``)."""
    store = ConfigStore.instance()
    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _hydra_tags() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "hydra.overrides": " ".join(hc.overrides.task)[:5000],
        "hydra.output_dir": str(hc.runtime.output_dir),
        "hydra.job": f"{hc.job.name}#{hc.job.num}" if _in_multirun() else hc.job.name,
    }


def _log_hydra_files() -> None:
    if HydraConfig.initialized():
        import mlflow

        hydra_dir = os.path.join(HydraConfig.get().runtime.output_dir, ".hydra")
        if os.path.isdir(hydra_dir):
            mlflow.log_artifacts(hydra_dir, ".hydra")


def run_job(cfg: DictConfig) -> float | None:
    """One job: connect to MLflow, open a run, train, close the run FINISHED or FAILED.

    A bad input prints one line and exits 2 in a single run; in a multirun it fails only this job
    (the run is FAILED in MLflow, the sweep goes on) and returns None."""
    import mlflow

    from . import tracking
    from .train import train_and_log

    try:
        uri = tracking.resolve_uri(cfg.tracking)
        client = tracking.connect(uri)
        experiment_id = tracking.ensure_experiment(client, uri, cfg.tracking.experiment)
    except UserError as exc:
        return _fail(exc)
    mlflow.set_tracking_uri(uri)
    tags = {
        "config_hash": tracking.config_hash(cfg),
        **tracking.git_state(),
        **tracking.package_versions(),
        **_hydra_tags(),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.tracking.run_name, tags=tags) as run:
        try:
            mlflow.log_params(tracking.config_params(cfg))
            _log_hydra_files()
            validate(cfg)
            result = train_and_log(cfg)
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
    return result


def _fail(exc: UserError, run_id: str | None = None) -> None:
    where = f" (MLflow run {run_id} marked FAILED)" if run_id else ""
    print(f"error: {exc}{where}", file=sys.stderr)
    if _in_multirun():
        return None
    sys.exit(2)


register_configs()
register_experiments()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def main() -> None:
    """Console-script entry point (``ablate``)."""
    _app()


if __name__ == "__main__":
    main()

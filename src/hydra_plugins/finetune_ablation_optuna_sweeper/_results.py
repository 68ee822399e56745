"""What a sweep leaves behind: ``optimization_results.yaml`` and plots in the sweep dir (as the PyPI
plugin writes), and the same on the multirun's MLflow parent run when the suite's grouping made one."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from ._study import printable_url
from .handoff import MLFLOW_RUN_USER_ATTR

log = logging.getLogger(__name__)


def summarize(study: optuna.Study, total: int, storage_url: str) -> dict[str, Any]:
    """The study in a few keys; ``name``, ``best_params`` and ``best_value`` as the PyPI plugin has them."""
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": printable_url(storage_url),
        "direction": study.direction.name.lower(),
        "n_trials": total,
        "trials": dict(sorted(counts.items())),
        "best_params": None,
        "best_value": None,
    }
    if counts["complete"]:
        best = study.best_trial
        results.update(
            best_params=dict(best.params),
            best_value=best.value,
            best_trial_number=best.number,
            best_mlflow_run_id=best.user_attrs.get(MLFLOW_RUN_USER_ATTR),
        )
    return results


def write_outputs(study: optuna.Study, results: dict[str, Any], sweep_dir: Path) -> list[Path]:
    """``optimization_results.yaml`` plus the plots, in the sweep dir; returns the files written."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "optimization_results.yaml"
    OmegaConf.save(OmegaConf.create(results), path)
    return [path, *_plots(study, sweep_dir)]


def _plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, and per-parameter slices (plus importances when there are 2+ params)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    import matplotlib

    matplotlib.use("Agg")  # the sweeper may run without a display
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as vis

    plots = {"optimization_history.png": vis.plot_optimization_history, "slice.png": vis.plot_slice}
    if len(complete) >= 2 and len({name for t in complete for name in t.params}) >= 2:
        plots["param_importances.png"] = vis.plot_param_importances
    written = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
            figure = np.ravel(axes)[0].figure
            figure.savefig(out / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(out / name)
        except Exception as exc:  # a plot is a convenience; the study itself is in the storage
            log.warning("could not draw %s: %s", name, exc)
    return written


def log_to_parent(
    config: DictConfig, results: dict[str, Any], files: list[Path], launched: int = 0, failed: int = 0
) -> str | None:
    """Log the results on this multirun's MLflow parent run; the run id, or None without a parent.

    ``launched``/``failed`` (this launch's trials) are tagged too: a trial can fail before its job
    opens an MLflow run, and the grouping's end-of-sweep callback counts them in the exit status.

    The parent run comes from the suite's multirun grouping, found through the app's one interface
    for this plugin (``finetune_ablation.sweeper_api``); without that grouping, or outside the suite's
    config, nothing is logged."""
    from finetune_ablation import sweeper_api as app

    found = app.parent_run(config)
    if found is None:
        log.info("no MLflow parent run for this sweep dir: the results stay in the sweep dir only")
        return None
    client, run_id = found
    _log_results(client, run_id, results, files)
    client.set_tag(run_id, app.record.SWEEPER_LAUNCHED_TAG, str(launched))
    client.set_tag(run_id, app.record.SWEEPER_FAILED_TAG, str(failed))
    return run_id


def _log_results(client: Any, run_id: str, results: dict[str, Any], files: list[Path]) -> None:
    from finetune_ablation.sweeper_api import record as rec

    client.set_tag(run_id, rec.OPTUNA_STUDY_TAG, results["study_name"])
    client.set_tag(run_id, rec.OPTUNA_STORAGE_TAG, results["storage"])
    for state, count in results["trials"].items():
        client.log_metric(run_id, f"{rec.OPTUNA_TRIALS_METRIC_PREFIX}{state}", count)
    if results["best_value"] is not None:
        client.log_metric(run_id, rec.OPTUNA_BEST_VALUE, results["best_value"])
        client.set_tag(run_id, rec.OPTUNA_BEST_TRIAL_TAG, str(results["best_trial_number"]))
        if results.get("best_mlflow_run_id"):
            client.set_tag(run_id, rec.OPTUNA_BEST_RUN_TAG, results["best_mlflow_run_id"])
        for name, value in results["best_params"].items():
            client.log_param(run_id, f"{rec.OPTUNA_BEST_PARAM_PREFIX}{name}", str(value)[: rec.MAX_PARAM_LENGTH])
    for path in files:
        client.log_artifact(run_id, str(path), rec.OPTUNA_ARTIFACT_DIR)

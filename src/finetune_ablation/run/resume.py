"""Resume (``resume=true`` in a multirun): which FINISHED run may stand in for a job, and why not.

A job is skipped only when a FINISHED run computed exactly what it would compute: the same config
(``tracking.config_hash``: display and bookkeeping settings such as ``train.verbose`` left out), the
same images (``data.fingerprint``: relative paths and contents, so new images under the same
``data.dir``, or another user's folder at the same path on a shared server, are never reused), the
same code (a hash of the package's source; the git commit is logged beside it to say what changed),
the same package versions and, when ``model.weights`` is a file, the same file content. These are the
phase-1 cache's inputs (phase1_cache.py ``phase1_key``). Reproductions (``ablate-reproduce``) and pruned
Optuna trials never stand in for a job. Every decision is one log line that says why."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from omegaconf import DictConfig

from .. import tracking
from ..errors import UserError
from ..fingerprints import code_sha256, file_sha256, weights_file
from ..record import (
    CODE_TAG,
    CONFIG_HASH_TAG,
    DATA_FINGERPRINT_TAG,
    GIT_COMMIT_TAG,
    PRUNED_TAG,
    REPRODUCED_TAG,
    TRUE,
    VERSION_TAG_PREFIX,
    WEIGHTS_FILE_TAG,
)

log = logging.getLogger("finetune_ablation")


def _weights_file_sha256(weights: str | None) -> str | None:
    path = weights_file(weights)
    if path is None:
        return None
    if not path.is_file():
        return "missing"  # the job fails on it with its own error line
    return file_sha256(path)


def identity_tags(cfg: DictConfig) -> dict[str, str]:
    """The tags every run carries at its start, so a later sweep can tell whether it may be reused."""
    tags = {
        CONFIG_HASH_TAG: tracking.config_hash(cfg),
        CODE_TAG: code_sha256(),
        **tracking.git_state(),
        **tracking.package_versions(),
    }
    weights = _weights_file_sha256(cfg.model.weights)
    if weights is not None:
        tags[WEIGHTS_FILE_TAG] = weights
    return tags


def data_fingerprint(cfg: DictConfig) -> str | None:
    """The fingerprint the training will log for these images (None when the folder cannot be read:
    the job then fails on it with its own error line)."""
    from .image_files import fingerprint, list_images

    try:
        if cfg.data.synthetic:
            from ..demo_data import ensure_demo_dataset

            ensure_demo_dataset(cfg.data.dir, cfg.data.synthetic_images_per_class)
        return fingerprint(list_images(cfg.data.dir)[1])
    except UserError:
        return None


def _short(value: str | None) -> str:
    return (value or "unknown")[:12]


def _differences(run: Run, tags: dict[str, str]) -> list[str]:
    """Why ``run`` computed something else than a job tagged ``tags`` would (data not included)."""
    old = run.data.tags
    reasons = []
    if old.get(CODE_TAG) != tags[CODE_TAG]:
        before, now = old.get(GIT_COMMIT_TAG), tags.get(GIT_COMMIT_TAG)
        if CODE_TAG not in old:
            reasons.append("the run predates the code fingerprint (tag code.sha256)")
        elif before != now:
            reasons.append(f"the code changed (commit {_short(before)}->{_short(now)})")
        else:
            reasons.append(f"the code changed (uncommitted changes at commit {_short(now)})")
    versions = [
        f"{key.removeprefix(VERSION_TAG_PREFIX)} {old.get(key, 'unknown')}->{value}"
        for key, value in tags.items()
        if key.startswith(VERSION_TAG_PREFIX) and old.get(key) != value
    ]
    if versions:
        reasons.append(f"package versions changed ({', '.join(versions)})")
    if old.get(WEIGHTS_FILE_TAG) != tags.get(WEIGHTS_FILE_TAG):
        reasons.append("the model.weights file changed")
    return reasons


def _finished_runs_of_config(client: mlflow.MlflowClient, experiment_id: str, config_hash: str) -> list[Run]:
    """FINISHED runs of this config, newest first, without reproductions and pruned trials."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{CONFIG_HASH_TAG} = '{config_hash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return [r for r in found if REPRODUCED_TAG not in r.data.tags and r.data.tags.get(PRUNED_TAG) != TRUE]


@dataclass(frozen=True)
class Decision:
    """What resume decided for one job: the run to reuse (or None) and the log line saying why."""

    reuse: Run | None
    reason: str | None  # None: no FINISHED run of this config, nothing to say


def decide(client: mlflow.MlflowClient, experiment_id: str, cfg: DictConfig, tags: dict[str, str]) -> Decision:
    """The newest FINISHED run identical to this job in config, data, code and packages, if any."""
    candidates = _finished_runs_of_config(client, experiment_id, tags[CONFIG_HASH_TAG])
    if not candidates:
        return Decision(None, None)
    fingerprint: str | None = None
    first_reasons: list[str] = []
    for run in candidates:
        reasons = _differences(run, tags)
        if not reasons:
            if fingerprint is None:
                fingerprint = data_fingerprint(cfg) or "unreadable"
            if run.data.tags.get(DATA_FINGERPRINT_TAG) != fingerprint:
                reasons.append(
                    f"the images under data.dir changed (data fingerprint "
                    f"{_short(run.data.tags.get(DATA_FINGERPRINT_TAG))}->{_short(fingerprint)})"
                )
        if not reasons:
            return Decision(
                run,
                f"skipped: identical run {run.info.run_id} FINISHED (same config, data, code and packages; "
                "resume=false runs it again)",
            )
        first_reasons = first_reasons or reasons
    newest = candidates[0].info.run_id
    return Decision(None, f"re-running: a FINISHED run of this config exists ({newest}) but {'; '.join(first_reasons)}")

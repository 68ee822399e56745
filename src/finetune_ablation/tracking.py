"""MLflow plumbing (config group ``tracking``): where runs go, how a run starts and ends, what it is tagged.

One tracking URI rule everywhere: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an absolute
sqlite file under the project's ``mlruns/`` (docs/stack-facts.md: MLflow's own default is relative to the cwd)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from .config import NOT_HASHED, TrackingConfig, schema_of, without_roles
from .errors import UserError
from .fingerprints import versions
from .paths import PROJECT_ROOT, default_tracking_uri
from .record import (
    DESCRIPTION_TAG,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    VERSION_TAG_PREFIX,
)
from .store import ensure_created


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _no_http_retries():
    """MLflow retries an unreachable server for minutes; a reachability probe should fail fast."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def connect(uri: str) -> mlflow.MlflowClient:
    """A client for ``uri``, checked to answer; a clear error naming the URI otherwise."""
    db = sqlite_path(uri)
    if db is not None:
        if uri == default_tracking_uri():
            db.parent.mkdir(parents=True, exist_ok=True)
        elif not db.parent.is_dir():
            raise UserError(
                f"tracking URI {uri} points into a missing folder {db.parent}: create it or fix "
                "tracking.uri / MLFLOW_TRACKING_URI"
            )
    ensure_created(uri, db)  # parallel first use of a new sqlite store: migrate once, under a lock
    try:
        client = mlflow.MlflowClient(uri)
    except Exception as exc:  # an unknown scheme (bogus://x) fails here
        scheme = uri.split(":", 1)[0] if ":" in uri else uri
        reason = f"unsupported URI scheme {scheme!r}" if "unsupported URI" in str(exc) else _first_line(exc)
        raise UserError(
            f"MLflow cannot open the tracking URI {uri} ({reason}): use sqlite:///ABSOLUTE/PATH.db or "
            "http://HOST:PORT in tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
    try:
        with _no_http_retries():
            client.search_experiments(max_results=1)
    except Exception as exc:
        raise UserError(
            f"cannot reach the MLflow tracking store {uri} ({_first_line(exc)}): start the server or fix "
            "tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
    return client


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a local store's artifacts beside its database, whatever the working directory."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a server decides for itself
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (db.parent / "artifacts" / safe).as_uri()


def ensure_experiment(client: mlflow.MlflowClient, uri: str, name: str) -> str:
    """The experiment's id, creating it if needed; safe when parallel jobs race to create it. It is described
    (what it holds: descriptions.experiment_description) unless someone described it already."""
    from .descriptions import experiment_description

    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) or set "
                "tracking.experiment to another name"
            )
        if DESCRIPTION_TAG not in existing.tags:  # an experiment from before the suite described them
            client.set_experiment_tag(existing.experiment_id, DESCRIPTION_TAG, experiment_description(name))
        return existing.experiment_id
    try:
        tags = {EXPERIMENT_KIND_TAG: "custom_model_development", DESCRIPTION_TAG: experiment_description(name)}
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name), tags=tags)
    except MlflowException:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def flatten(container: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (``model.fine_tune_at``); lists stay whole values."""
    out: dict[str, Any] = {}
    if isinstance(container, dict):
        for key, value in container.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = container
    return out


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The whole resolved config as MLflow params (values capped at MLflow's ``MAX_PARAM_LENGTH``)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(container).items()}


def config_hash(cfg: DictConfig) -> str:
    """Identity of what a run computes: the resolved config without its ``recording`` and ``display``
    keys (config.Role), so resume matches runs that differ only in where or how they were recorded."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    kept = without_roles(container, NOT_HASHED, schema_of(cfg))
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the project checkout ("unknown" outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {GIT_COMMIT_TAG: git("rev-parse", "HEAD"), GIT_DIRTY_TAG: str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.SubprocessError):
        return {GIT_COMMIT_TAG: "unknown", GIT_DIRTY_TAG: "unknown"}


def package_versions() -> dict[str, str]:
    dists = ("tensorflow", "keras", "mlflow", "hydra-core", "optuna", "numpy", "finetune-ablation")
    return {f"{VERSION_TAG_PREFIX}{dist}": version for dist, version in versions(dists).items()}


def end_run_failed(error: BaseException, status: str = "FAILED") -> None:
    """Mark the active run FAILED (or KILLED) with its error as a tag, so nothing is lost silently."""
    if mlflow.active_run() is None:
        return
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    with contextlib.suppress(Exception):
        mlflow.set_tag(ERROR_TAG, f"{type(error).__name__}: {message}"[:MAX_TAG_LENGTH])
    mlflow.end_run(status=RunStatus.to_string(getattr(RunStatus, status)))

"""Reading a tracking store back (``ablate-report``, ``ablate-reproduce``): the same URI rule as
``ablate``, a store that must already exist (a typo must not create an empty database), runs named
by id."""

from __future__ import annotations

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from . import tracking
from .config import TrackingConfig
from .errors import UserError


def default_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the project's sqlite store: the rule of ``tracking.resolve_uri``."""
    return tracking.resolve_uri(TrackingConfig())


def open_store(uri: str) -> mlflow.MlflowClient:
    """A client for an existing store; reading must never create a new, empty one."""
    db = tracking.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(
            f"no MLflow store at {db} (tracking URI {uri}): run ablate first, or pass "
            "--tracking-uri / set MLFLOW_TRACKING_URI to the store that holds the runs"
        )
    return tracking.connect(uri)


def get_run(client: mlflow.MlflowClient, run_id: str, uri: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"no MLflow run {run_id!r} in the store {uri}: copy the id from the MLflow UI, or pass "
            "--tracking-uri for another store"
        ) from None

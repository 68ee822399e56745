"""Create and migrate a local MLflow store once, under a file lock, before parallel use.

MLflow creates and migrates an sqlite database (alembic) the first time a process opens it, with no
lock of its own: several processes that open a store which does not exist yet race in that migration
and die (``alembic_version``, ``duplicate column name: step``; see docs/stack-facts.md). So every
process of the suite opens a local store for the first time while holding ``<db>.lock`` beside the
database: the first one creates and migrates it, the others wait and then find it ready."""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock

LOCK_TIMEOUT_S = 300  # creating and migrating a store takes seconds; a held lock this long is a bug
_ready: set[str] = set()  # URIs this process already opened under the lock


def lock_path(db: Path) -> Path:
    """The lock file beside an sqlite database: ``mlflow.db`` -> ``mlflow.db.lock``."""
    return db.with_name(db.name + ".lock")


def ensure_created(uri: str, db: Path | None) -> None:
    """Open the store at ``uri`` once in this process under its lock, so MLflow creates or migrates
    its schema in one process at a time. ``db`` is the sqlite file (None: a server or another
    database, which migrates on its own side; nothing to do)."""
    if db is None or uri in _ready or not db.parent.is_dir():
        return
    import mlflow

    # the schema is the suite's business: MLflow's "Creating initial MLflow database tables..." and
    # "Updating database tables" would stand above a user's first epoch line or one error line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with FileLock(str(lock_path(db)), timeout=LOCK_TIMEOUT_S):
        # the first client creates (or migrates) the schema; MLflow caches that store per process
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    _ready.add(uri)

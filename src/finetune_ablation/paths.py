"""Where the project's files live. The suite runs from its clone (``pip install -e .``), so the
Hydra configs, the studies and the local MLflow store are found relative to the repository root."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
MLRUNS_DIR = PROJECT_ROOT / "mlruns"


def default_tracking_uri() -> str:
    """Absolute sqlite URI under the project's ``mlruns/`` (MLflow's own default is relative to the working
    directory: docs/stack-facts.md M1)."""
    return f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"

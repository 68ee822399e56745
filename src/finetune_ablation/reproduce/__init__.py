"""``ablate-reproduce RUN_ID``: run a logged run again and compare every per-epoch metric. ``app`` runs
and compares; ``rebuild`` rebuilds the logged config as untrusted input (docs/reproduce.md)."""

from .app import main

__all__ = ["main"]

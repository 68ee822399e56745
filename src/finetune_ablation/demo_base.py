"""The offline demo base shipped with the package (``model.weights=demo``): where its weights and card
live, reading the card, and recording which base a run used. ``ablate-pretrain`` (pretrain.py) makes the
pair; a run only reads it, so the training never imports the command that made its base."""

from __future__ import annotations

import json
from pathlib import Path

BASES_DIR = Path(__file__).resolve().parent / "bases"
WEIGHTS_NAME = "demo_base.weights.h5"
CARD_NAME = "demo_base.json"


def demo_weights_path() -> str:
    """The shipped demo base's weights file (``model.weights=demo``)."""
    return str(BASES_DIR / WEIGHTS_NAME)


def demo_card(bases_dir: Path = BASES_DIR) -> dict:
    return json.loads((bases_dir / CARD_NAME).read_text())


def log_card(card: dict) -> None:
    """Record which offline base a run used: the card as an artifact, its identity as tags."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_dict(card, "base_card.json")
    mlflow.set_tags(
        {
            "base.name": card["name"],
            "base.sha256": card["sha256"],
            "base.source_val_accuracy": str(card["source_val_accuracy"]),
            "base.seed": str(card["seed"]),
            "base.epochs": str(card["epochs"]),
        }
    )

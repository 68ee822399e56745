"""Resident memory of one run at the end of every phase-2 epoch: does a run grow while it trains?

    python benchmarks/memory_per_epoch.py TRACKING_URI OVERRIDE ...

Composes ``conf/`` with the overrides exactly as ``ablate`` does and runs the training in this process
inside one MLflow run, with a callback that reads this process's resident set size after each phase-2
epoch (benchmarks/resident.py). Prints the sizes (MiB) as JSON. Used by benchmarks/speed.py, row 6."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow
from hydra import compose, initialize_config_dir
from resident import ResidentPerEpoch

from finetune_ablation.config import register_configs
from finetune_ablation.paths import CONF_DIR
from finetune_ablation.run.train import train_and_log


def main() -> None:
    uri, overrides = sys.argv[1], sys.argv[2:]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"tracking.uri={uri}"])
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    callback = ResidentPerEpoch()
    with mlflow.start_run():
        train_and_log(cfg, [callback])
    print(json.dumps({"phase2_epoch_end_mib": callback.sizes}))


if __name__ == "__main__":
    main()

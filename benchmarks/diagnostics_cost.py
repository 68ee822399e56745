"""Cost of the gap measurement: the demo run at diagnostics.level full / final / off, side by side.

    python benchmarks/diagnostics_cost.py [--repeats 2] [--out benchmarks/diagnostics_cost.csv] [overrides...]

Runs are interleaved (off, final, full, off, final, full, ...) in one process so machine noise hits all
levels alike; the table reports each level's median wall time and its ratio to ``off``."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd
from hydra import compose, initialize_config_dir

from finetune_ablation import cli
from finetune_ablation.paths import CONF_DIR

LEVELS = ("off", "final", "full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/diagnostics_cost.csv")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.image_size=160")
    args = parser.parse_args()

    times: dict[str, list[float]] = {level: [] for level in LEVELS}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = ["experiment=demo", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "train.verbose=0", *args.overrides]
        cli.run_job(compose("config", overrides=[*base, "diagnostics=off"]))  # warm-up: data, caches
        for _ in range(args.repeats):
            for level in LEVELS:
                cfg = compose("config", overrides=[*base, f"diagnostics={level}"])
                start = time.perf_counter()
                cli.run_job(cfg)
                times[level].append(time.perf_counter() - start)

    off = statistics.median(times["off"])
    table = pd.DataFrame(
        {
            "level": level,
            "median_seconds": round(statistics.median(times[level]), 2),
            "ratio_to_off": round(statistics.median(times[level]) / off, 2),
            "repeats": len(times[level]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        }
        for level in LEVELS
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()

"""How much the removal order changes each gap component, on the demo and on a small study.

The measurement removes BatchNorm, dropout and augmentation in that order, so an interaction of two
effects lands in the component of the one removed first. This script trains real runs with
``diagnostics.attribution=shapley`` (the meter then measures all eight 2x2x2 corners on the epoch's own
batches, augmentations and dropout masks) and prints, at the last epoch of each phase, each component under
each of the six removal orders, its spread over the orders, the Shapley value (their average), and whether
some order changes a component's sign or the ranking of the five components by size (the order
``gap_summary.txt`` lists them in). Results and what they mean: docs/gap-measurement.md, "The removal order".

    python benchmarks/removal_order.py              # the demo, then the study (seeds 1, 2, 3)
    python benchmarks/removal_order.py --runs demo  # the demo only

Nothing is logged to MLflow; the demo's images are generated offline as ``ablate experiment=demo`` does.
"""

from __future__ import annotations

import argparse
import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hydra import compose, initialize_config_dir

from finetune_ablation import record as rec
from finetune_ablation.config import register_configs
from finetune_ablation.console import points
from finetune_ablation.gap.decomposition import EFFECTS, ordered_components, shapley_components
from finetune_ablation.paths import CONF_DIR

ORDERS = list(itertools.permutations(EFFECTS))
CHAIN = EFFECTS  # the order the measurement uses by default
# the demo as ``ablate experiment=demo`` runs it, and the same with three other seeds (the split follows
# the seed): measured at the last epoch of each phase, phase 1 trained (not loaded from the cache)
RUNS = {
    "demo": ["experiment=demo"],
    **{f"study seed={s}": ["experiment=demo", f"seed={s}", f"data.seed={s}"] for s in (1, 2, 3)},
}
COMMON = ["diagnostics=final", "diagnostics.attribution=shapley", "cache.phase1=false", "train.verbose=0"]


class _Null:
    """A recorder that keeps nothing: the numbers come from the meter's corners."""

    def __getattr__(self, name):
        if name == "figure":
            return lambda figure, _: __import__("matplotlib.pyplot").pyplot.close(figure)
        return lambda *args, **kwargs: None


def measure(overrides: list[str]) -> list[dict]:
    """Train one run; per measured epoch: the corners (accuracy and loss) and the epoch's logs."""
    from finetune_ablation.gap import callback, meter
    from finetune_ablation.run.train import train_and_log

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *COMMON])
    found: list[dict] = []
    measure_corners, end_epoch = meter.GapMeter.measure, callback.GapCallback.on_epoch_end

    def keep_corners(self, epoch, scorer, corners=False):
        out = measure_corners(self, epoch, scorer, corners)
        found.append({"epoch": epoch, "accuracy": out["corner_accuracy"], "loss": out["corner_loss"]})
        return out

    def keep_logs(self, epoch, logs=None):
        end_epoch(self, epoch, logs)
        if found and found[-1]["epoch"] == epoch:
            found[-1]["logs"] = dict(logs)

    meter.GapMeter.measure, callback.GapCallback.on_epoch_end = keep_corners, keep_logs
    try:
        train_and_log(cfg, recorder=_Null())
    finally:
        meter.GapMeter.measure, callback.GapCallback.on_epoch_end = measure_corners, end_epoch
    return found


def _ranked(components: dict[str, float], metric: str) -> tuple[str, ...]:
    """The components by size, largest first: in points for accuracy, as the summary lists them."""
    size = (lambda v: abs(round(100 * v, 1))) if metric == "accuracy" else abs
    return tuple(sorted(components, key=lambda c: -size(components[c])))


def report(corners: dict, lag: float, split: float, metric: str) -> dict:
    """Print each component under every order, the chain's, the Shapley values and the findings."""
    by_order = [ordered_components(corners, order) for order in ORDERS]
    shapley = shapley_components(corners)
    digits, scale = (1, 100) if metric == "accuracy" else (4, 1)

    def fmt(value: float) -> str:
        return f"{round(scale * value, digits) + 0.0:+.{digits}f}"

    print(f"  {metric}, by order: " + "; ".join(f"{e} {' '.join(fmt(c[e]) for c in by_order)}" for e in EFFECTS))
    spread = {e: scale * (max(c[e] for c in by_order) - min(c[e] for c in by_order)) for e in EFFECTS}
    signs = sorted(e for e in EFFECTS if len({fmt(c[e])[0] for c in by_order if float(fmt(c[e])) != 0}) > 1)
    rankings = {_ranked({**c, "lag": lag, "split": split}, metric) for c in by_order}
    chain = ordered_components(corners, CHAIN)
    print("    chain:   " + ", ".join(f"{e} {fmt(chain[e])}" for e in EFFECTS))
    print("    shapley: " + ", ".join(f"{e} {fmt(shapley[e])}" for e in EFFECTS))
    print("    spread over the orders: " + ", ".join(f"{e} {spread[e]:.{digits}f}" for e in EFFECTS))
    print(f"    a sign changes: {', '.join(signs) or 'none'}; rankings of the five components: {len(rankings)}")
    return {"spread": spread, "signs": signs, "rankings": len(rankings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help=f"which of {list(RUNS)}")
    args = parser.parse_args()
    print("orders (each component's value under):", " ".join("-".join(e[:4] for e in o) for o in ORDERS))
    for name in args.runs:
        for row in measure(RUNS[name]):
            logs = row["logs"]
            print(f"{name}, step {row['epoch']}: gap/total {points(logs[rec.GAP_TOTAL])}")
            for metric, prefix in (("accuracy", rec.GAP_PREFIX), ("loss", rec.GAP_LOSS_PREFIX)):
                report(row[metric], logs[f"{prefix}lag"], logs[f"{prefix}split"], metric)


if __name__ == "__main__":
    main()

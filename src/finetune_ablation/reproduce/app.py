"""``ablate-reproduce RUN_ID``: run a logged run again and show that every per-epoch metric matches.

    ablate-reproduce 3f2c...  [--tracking-uri URI] [--tolerance 0] [--allow-data-change]

The config is the run's own logged ``config.yaml``, checked as untrusted input (``rebuild``)
and cross-checked against today's ``conf/`` with the run's Hydra overrides. A different dataset stops
the reproduction (the numbers could not be compared); a different git commit or package versions are
warnings. The new run is tagged ``reproduced_from=RUN_ID`` and gets ``reproduce/max_abs_diff``; the
exit code is 0 only when every metric of every epoch matches within ``--tolerance`` (default 0: the
same machine and versions must give the same bits, docs/stack-facts.md T1)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf

from .. import console, tracking
from .. import record as rec
from ..errors import UserError, run_cli
from ..runstore import default_uri, get_run, open_store
from ..threads import Grant, for_job
from ..threads import apply as apply_threads
from .rebuild import rebuild

# written by the reproduction / wall-clock system metrics
_NOT_COMPARED = (rec.REPRODUCE_METRIC_PREFIX, rec.SYSTEM_METRIC_PREFIX)
History = list[tuple[int, float]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ablate-reproduce", description="Run a logged run again and compare every per-epoch metric."
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the MLflow run to reproduce")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlruns/mlflow.db)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.0, help="largest allowed |difference| of any metric (default 0)"
    )
    parser.add_argument(
        "--allow-data-change", action="store_true", help="go on when the dataset differs from the run's"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Checks before running


def check_reproducible(run: Run) -> None:
    """Only a finished job can be compared epoch by epoch."""
    rid, tags = run.info.run_id, run.data.tags
    if tags.get(rec.ROLE_TAG) == rec.PARENT_ROLE:
        raise UserError(f"run {rid} is a sweep's parent run: reproduce one of its child runs instead")
    if tags.get(rec.PRUNED_TAG) == rec.TRUE:
        raise UserError(f"run {rid} was pruned early: a re-run trains every epoch, so it cannot be compared")
    if run.info.status != "FINISHED":
        raise UserError(f"run {rid} is {run.info.status}: only FINISHED runs can be reproduced")


def check_data(cfg: DictConfig, run: Run, allow_change: bool) -> list[str]:
    """Recompute the dataset fingerprint the way the run computed it; a change stops the reproduction
    unless allowed."""
    from ..run.data import load_datasets  # TensorFlow: only once the config passed every check

    logged = run.data.tags.get(rec.DATA_FINGERPRINT_TAG)
    try:
        now = load_datasets(cfg.data).fingerprint
    except UserError as exc:
        raise UserError(f"cannot read the dataset of run {run.info.run_id}: {exc}") from None
    if logged is None:
        return [f"run {run.info.run_id} logged no data.fingerprint: the dataset cannot be checked"]
    if now == logged:
        return []
    where = "the regenerated images (data.synthetic=true)" if cfg.data.synthetic else f"data.dir={cfg.data.dir}"
    message = (
        f"the dataset at {where} differs from the one run {run.info.run_id} used "
        f"(fingerprint {logged[:12]}... logged, {now[:12]}... now)"
    )
    if not allow_change:
        raise UserError(f"{message}: the metrics could not be compared; restore it or pass --allow-data-change")
    return [f"{message}; going on (--allow-data-change)"]


def environment_warnings(run: Run) -> list[str]:
    """Code and package versions that differ from the run's: the numbers may differ for that reason."""
    tags, out = run.data.tags, []
    git = tracking.git_state()
    commit = rec.GIT_COMMIT_TAG
    if tags.get(commit) not in (None, git[commit]):
        out.append(f"run was made at git commit {tags[commit][:12]}, this checkout is at {git[commit][:12]}")
    if tags.get(rec.GIT_DIRTY_TAG) == "True":
        out.append("run was made with uncommitted changes (git.dirty=True): its exact code is not recorded")
    for key, now in tracking.package_versions().items():
        then = tags.get(key)
        if then is not None and then != now:
            out.append(f"{key.removeprefix(rec.VERSION_TAG_PREFIX)} was {then} for the run, is {now} here")
    return out


@contextlib.contextmanager
def own_data_dir(cfg: DictConfig, run: Run) -> Iterator[DictConfig]:
    """The config with a data folder the reproduction may write. A run with generated images
    (``data.synthetic=true``) names the folder it wrote them into, and generating means writing (and
    deleting old PNGs) there: a logged run must not choose where this machine writes. The images are a
    function of the logged seed and count, so they are generated again into a temporary folder of the
    reproduction's own, removed when it ends; the logged folder is never touched. A user folder
    (``synthetic=false``) is only read."""
    if not cfg.data.synthetic:
        yield cfg
        return
    with tempfile.TemporaryDirectory(prefix="ablate-reproduce-data-") as tmp:
        print(
            f"note: run {run.info.run_id} generated its images (data.synthetic=true): generating them again "
            f"in {tmp} (nothing is written at the logged data.dir={cfg.data.dir})",
            file=sys.stderr,
        )
        yield OmegaConf.merge(cfg, {"data": {"dir": tmp}})


def reproduction_config(cfg: DictConfig, run: Run, experiment: str, uri: str) -> DictConfig:
    """The logged config, recorded into this store and the original's experiment under a telling name.
    Phase 1 is trained again, never loaded from the phase-1 cache: a reproduction recomputes everything
    (and never writes into a ``cache.dir`` the logged run names)."""
    name = f"reproduce {run.info.run_name or run.info.run_id}"[: rec.MAX_RUN_NAME_LENGTH]
    return OmegaConf.merge(
        cfg,
        {"tracking": {"uri": uri, "experiment": experiment, "run_name": name}, "cache": {"phase1": False}},
    )


def run_threads(cfg: DictConfig, run: Run) -> tuple[DictConfig, Grant]:
    """The config with the thread count the run used (its logged ``threads``: the count changes the last
    bits, docs/reproduce.md). A run logged before the count was recorded (``threads: null``) gets this
    machine's count, with a warning."""
    resolved, grant = for_job(cfg)
    if cfg.threads is None:
        _warn(
            [
                f"run {run.info.run_id} logged no thread count (threads: null, an older version of the suite): "
                f"reproducing with {grant.threads} ({grant.granted_by}); a job of a parallel sweep used fewer "
                "and may differ in the last bits"
            ]
        )
    return resolved, grant


# ---------------------------------------------------------------------------------------------------
# Comparing


@dataclass
class Comparison:
    table: pd.DataFrame  # metric, values, max_abs_diff, problem
    max_abs_diff: float

    def matches(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def metric_histories(client: mlflow.MlflowClient, run: Run) -> dict[str, History]:
    """Every metric of a run as (step, value) in logging order, without the ones never compared."""
    out = {}
    for key in run.data.metrics:
        if not key.startswith(_NOT_COMPARED):
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
            out[key] = [(m.step, m.value) for m in history]
    return out


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b)


def compare(original: dict[str, History], again: dict[str, History]) -> Comparison:
    """Per metric, the largest |difference| over its epochs; a missing metric or epoch is infinite."""
    rows = []
    for key in sorted(original.keys() | again.keys()):
        a, b = original.get(key), again.get(key)
        if a is None or b is None:
            problem = "only in the reproduction" if a is None else "missing from the reproduction"
            rows.append({"metric": key, "values": len(a or b), "max_abs_diff": math.inf, "problem": problem})
        elif [s for s, _ in a] != [s for s, _ in b]:
            rows.append({"metric": key, "values": len(a), "max_abs_diff": math.inf, "problem": "different epochs"})
        else:
            diff = max((_diff(x, y) for (_, x), (_, y) in zip(a, b, strict=True)), default=0.0)
            rows.append({"metric": key, "values": len(a), "max_abs_diff": diff, "problem": ""})
    table = pd.DataFrame(rows, columns=["metric", "values", "max_abs_diff", "problem"])
    return Comparison(table, float(table["max_abs_diff"].max()) if len(table) else 0.0)


def record(client: mlflow.MlflowClient, run_id: str, comparison: Comparison, tolerance: float) -> None:
    """The verdict on the new run itself: metric, tags and the per-metric table."""
    client.log_metric(run_id, rec.REPRODUCE_DIFF_METRIC, comparison.max_abs_diff)
    client.set_tag(run_id, rec.REPRODUCE_MATCH_TAG, str(comparison.matches(tolerance)).lower())
    client.set_tag(run_id, rec.REPRODUCE_TOLERANCE_TAG, str(tolerance))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / rec.REPRODUCE_COMPARISON_CSV
        comparison.table.to_csv(path, index=False)
        client.log_artifact(run_id, str(path))


# ---------------------------------------------------------------------------------------------------


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _run_again(cfg: DictConfig, run_id: str) -> str:
    """Train through the same entry point as ``ablate`` and return the new run's id."""
    from ..run.job import run_job

    run_job(cfg, extra_tags={rec.REPRODUCED_TAG: run_id})  # a bad input exits 2 with its own error line
    new = mlflow.last_active_run()
    if new is None or new.data.tags.get(rec.REPRODUCED_TAG) != run_id:
        raise UserError(f"the reproduction of run {run_id} did not start a run")
    return new.info.run_id


def reproduce(args: argparse.Namespace) -> int:
    if not (args.tolerance >= 0):
        raise UserError(f"--tolerance={args.tolerance} must be a number >= 0")
    uri = args.tracking_uri or default_uri()
    client = open_store(uri)
    run = get_run(client, args.run_id, uri)
    check_reproducible(run)
    rebuilt = rebuild(client, run)
    _warn(rebuilt.warnings)
    _warn(
        [
            f"config key {k}: logged {a!r}, today's conf/ gives {b!r} (logged value used)"
            for k, a, b in rebuilt.differences
        ]
    )
    _warn(environment_warnings(run))
    console.quiet_startup()  # TensorFlow's CUDA and absl start-up lines, before anything imports it
    logged, grant = run_threads(rebuilt.cfg, run)
    apply_threads(grant.threads)  # before check_data starts TF's runtime, or the run's pools are lost
    experiment = client.get_experiment(run.info.experiment_id).name
    with own_data_dir(logged, run) as cfg:
        _warn(check_data(cfg, run, args.allow_data_change))
        new_id = _run_again(reproduction_config(cfg, run, experiment, uri), run.info.run_id)
    comparison = compare(metric_histories(client, run), metric_histories(client, client.get_run(new_id)))
    record(client, new_id, comparison, args.tolerance)
    values = int(comparison.table["values"].sum())
    summary = (
        f"run {run.info.run_id} reproduced as {new_id}: "
        f"{len(comparison.table)} metrics, {values} values compared, "
        f"max |diff| = {comparison.max_abs_diff:.6g} (tolerance {args.tolerance:g})"
    )
    if comparison.matches(args.tolerance):
        print(f"{summary}: match")
        return 0
    beyond = comparison.table[comparison.table["max_abs_diff"] > args.tolerance]
    worst = beyond.sort_values("max_abs_diff", ascending=False).head(5)
    detail = ", ".join(
        f"{r.metric} {r.max_abs_diff:.3g}{' ' + r.problem if r.problem else ''}" for r in worst.itertuples()
    )
    print(f"error: {summary}: MISMATCH ({detail})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``ablate-reproduce``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr to our lines
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("finetune_ablation").setLevel(logging.INFO)
    args = parse_args(argv)
    sys.exit(run_cli(lambda: reproduce(args)))


if __name__ == "__main__":
    main()

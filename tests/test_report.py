"""``ablate-report`` (issues 6, 11 and 33) on a real small study: 2 replicate blocks (``seed`` and
``data.seed`` together) x 2 dropout levels trained as child runs of a sweep's parent; a run that differs
only in ``model.bn_training=null`` (bit-identical to ``false`` in Keras 3: a factor that changes nothing)
and a ``resume=false`` rerun of one config (one replicate, not two); plus a failed, a pruned and a running
child that must be counted and left out.

Every number is checked against a computation made here, not by the report: pandas/scipy on the raw
values read back with MlflowClient (distinct runs grouped by their weights hash, blocks by their seed,
averaged within a block first), the majority-class rate from Keras's own split of the image folder, the
Wilson interval and Holm's adjustment written out by hand, and the t quantiles from printed tables.
The statistics' error rates on simulated studies are in tests/test_report_truth.py."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune_ablation.cli import run_job
from finetune_ablation.gap.decomposition import COMPONENTS
from finetune_ablation.report import app as report
from finetune_ablation.tracking import ensure_experiment

from .helpers import T_975, TOL, make_cfg, new_store, runs, wilson_by_hand

EXPERIMENT = "study"
SEEDS = (1, 2)
DROPOUTS = ("0.0", "0.5")
FILES = (
    "report.md",
    "main_effects.png",
    "gap_decomposition.png",
    "learning_curves.png",
    "factors.csv",
    "effects.csv",
    "gap_components.csv",
    "runs.csv",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory, image_dir):
    """(tracking URI, parent run id, ids of the finished children, report folder)."""
    tmp = tmp_path_factory.mktemp("study")
    uri = new_store(tmp)
    client = mlflow.MlflowClient(uri)
    experiment_id = ensure_experiment(client, uri, EXPERIMENT)
    parent = client.create_run(experiment_id, tags={"sweep.role": "parent", "sweep.dir": str(tmp)}).info.run_id
    child = {"mlflow.parentRunId": parent}

    def job(*overrides: str) -> float | None:
        cfg = make_cfg(
            image_dir,
            uri,
            f"tracking.experiment={EXPERIMENT}",
            "train.initial_epochs=1",
            "train.fine_tune_epochs=1",
            "model.fine_tune_at=150",  # still unfreezes the last conv and its BatchNorm; faster to trace
            *overrides,
        )
        return run_job(cfg, extra_tags=child)

    for seed in SEEDS:
        for dropout in DROPOUTS:
            assert job(f"seed={seed}", f"data.seed={seed}", f"model.dropout={dropout}") is not None
    assert job("seed=1", "data.seed=1", "model.dropout=0.5", "model.bn_training=null") is not None
    assert job("seed=1", "data.seed=1", "model.dropout=0.0", "resume=false") is not None  # a rerun
    finished = [r.info.run_id for r in runs(uri, EXPERIMENT) if r.info.run_id != parent]
    with pytest.raises(SystemExit):  # out of range: the run is FAILED before training
        job("model.dropout=0.95", "train.initial_epochs=0")
    for tags, status in (({"pruned": "true"}, "FINISHED"), ({}, None)):  # pruned, still running
        extra = client.create_run(experiment_id, tags={**child, **tags}).info.run_id
        client.log_param(extra, "model.dropout", "0.9")
        client.log_param(extra, "seed", "99")
        client.log_metric(extra, "val_accuracy", 0.0)
        if status:
            client.set_terminated(extra, status)
    client.set_terminated(parent, "FINISHED")

    out = tmp / "report"
    report.main(["--parent-run", parent, "--out", str(out), "--tracking-uri", uri])
    return uri, parent, finished, out


def _keras_majority(image_dir: Path, seed: int) -> tuple[float, int]:
    """Majority-class rate and size of the validation split, from Keras's own split of the folder."""
    val = keras.utils.image_dataset_from_directory(
        str(image_dir), validation_split=0.2, subset="validation", seed=seed, batch_size=None, image_size=(32, 32),
        verbose=False,
    )  # fmt: skip
    labels = np.array([int(y) for _, y in val])
    return float(np.bincount(labels).max() / len(labels)), len(labels)


@pytest.fixture(scope="module")
def raw(study, image_dir) -> pd.DataFrame:
    """The finished children as pandas rows, read straight from MLflow, with a ``unit`` per distinct
    model (its weights hash) and the majority rate of its validation split computed by Keras."""
    uri, _, finished, _ = study
    client = mlflow.MlflowClient(uri)
    rows = []
    for run_id in finished:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        params = run.data.params
        majority, val_count = _keras_majority(image_dir, int(params["data.seed"]))
        rows.append(
            {
                "run_id": run_id,
                "dropout": params["model.dropout"],
                "bn_training": params["model.bn_training"],
                "unit": run.data.tags["model.weights_sha256"],
                "block": int(params["seed"]),  # data.seed follows it: one block per seed
                "majority": majority,
                "val_count": val_count,
                **run.data.metrics,
            }
        )
    return pd.DataFrame(rows)


def _distinct(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.groupby("unit").mean(numeric_only=True)


def _blocks(frame: pd.DataFrame) -> pd.DataFrame:
    """Block means: distinct runs first (every config here ran once per block), then their mean per block."""
    return _distinct(frame).groupby("block").mean()


def _heading(total: float) -> str:
    """The gap section's question, by the sign of the total as printed (one decimal of a point)."""
    shown = round(100 * total, 1)
    if shown == 0:
        return "## Validation and training are level: what is in the gap?"
    return "## Why does validation beat training?" if shown > 0 else "## Why does training beat validation?"


def _markdown(study) -> str:
    return (study[3] / "report.md").read_text()


@pytest.mark.slow
def test_every_file_table_and_plot_is_written(study, raw):
    out = study[3]
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in FILES:
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                assert image.size[0] > 300 and image.size[1] > 200
    text = _markdown(study)
    blocks = _blocks(raw)
    total = (blocks["val_accuracy"] - blocks["accuracy"]).mean()
    for heading in (_heading(total), "## Factors", "### model.dropout", "## Learning curves"):
        assert heading in text
    for image in ("main_effects.png", "gap_decomposition.png", "learning_curves.png"):
        assert f"]({image})" in text


@pytest.mark.slow
def test_failed_pruned_and_running_runs_are_counted_and_left_out(study):
    text = _markdown(study)
    assert "**6 finished runs** are compared" in text
    assert "1 failed or killed, 1 pruned, 1 still running" in text
    assert "`model.dropout` (2 levels)" in text and "`model.bn_training` (2 levels)" in text
    factors = pd.read_csv(study[3] / "factors.csv", dtype={"level": str}, keep_default_na=False, na_values=[""])
    assert set(factors["factor"]) == {"model.dropout", "model.bn_training"}  # seeds are replicates
    dropout_levels = set(factors[factors["factor"] == "model.dropout"]["level"])
    assert sorted(dropout_levels) == list(DROPOUTS)  # neither 0.95 (failed) nor 0.9 (pruned/running)
    assert sorted(pd.read_csv(study[3] / "runs.csv")["run_id"]) == sorted(study[2])


@pytest.mark.slow
def test_the_study_has_the_copies_it_was_built_with(raw):
    """The premise of the tests below, read from the runs: bn_training=null and the rerun reproduce
    other runs bit for bit, so 6 runs are 4 distinct models."""
    assert len(raw) == 6 and raw["unit"].nunique() == 4
    null = raw[raw["bn_training"] == "None"]
    assert len(null) == 1 and set(null["unit"]) <= set(raw[raw["bn_training"] == "False"]["unit"])


@pytest.mark.slow
def test_first_lines_give_the_design_blocks_and_the_identical_factor(study):
    head = _markdown(study).split("\n## ")[0]
    assert (
        "**Design found.** Factors: `model.bn_training` (2 levels), `model.dropout` (2 levels); 3 configs. "
        "Replicate keys that vary: `seed` (2 values), `data.seed` (2 values), paired (one `data.seed` per "
        "`seed`). **2 independent blocks** (`seed=1, data.seed=1`; `seed=2, data.seed=2`)."
    ) in head
    assert "**Unbalanced**" not in head  # bn_training=null is bit-identical to false: the same config cell
    assert "Every interval below is over these 2 blocks (n = 2, 1 degree of freedom)" in head
    assert "**With only 2 blocks the intervals are wide**" in head
    assert (
        "**4 distinct runs** out of 6 finished: 1 run repeats the config and seeds of another run (a rerun "
        "is one replicate); 1 run is bit-identical to a run with another config (same `model.weights_sha256`)."
    ) in head
    assert "`seed` (2 values: weight initialisation, dropout masks and augmentation)" in head
    assert "`data.seed` (2 values: which images are in the validation split, and the shuffle order)" in head
    assert "The validation images change between replicates" in head
    assert "**Identical runs: `model.bn_training` changes nothing**" in head
    section = _markdown(study).split("### model.bn_training")[1].split("###")[0]
    assert "**Identical runs: this factor changes nothing.**" in section
    assert "in every comparison (1) of runs that differ only in `model.bn_training`" in section


@pytest.mark.slow
def test_factor_table_is_over_blocks_and_equals_pandas_on_the_raw_runs(study, raw):
    factors = pd.read_csv(
        study[3] / "factors.csv", dtype={"level": str}, keep_default_na=False, na_values=[""]
    ).set_index(["factor", "level", "metric"])
    checked = 0
    for factor, column in (("model.dropout", "dropout"), ("model.bn_training", "bn_training")):
        for level, at_level in raw.groupby(column):
            blocks = _blocks(at_level)
            for metric in report.METRICS:
                got = factors.loc[(factor, level, metric)]
                values = blocks[metric]
                assert got["runs"] == len(at_level) and got["distinct_runs"] == at_level["unit"].nunique()
                assert got["blocks"] == len(values)
                assert got["mean"] == pytest.approx(values.mean(), abs=TOL)
                if len(values) == 1:  # bn_training=null: one block, no spread, no interval
                    assert math.isnan(got["sd"]) and math.isnan(got["ci_low"]) and math.isnan(got["ci_high"])
                    checked += 1
                    continue
                assert got["sd"] == pytest.approx(values.std(ddof=1), abs=TOL)
                half = T_975[len(values) - 1] * values.std(ddof=1) / math.sqrt(len(values))
                assert got["ci_low"] == pytest.approx(values.mean() - half, abs=TOL)
                assert got["ci_high"] == pytest.approx(values.mean() + half, abs=TOL)
                checked += 1
    assert checked == 4 * len(report.METRICS)
    runs_at = factors.xs("val_accuracy", level="metric")["runs"]
    assert (runs_at[("model.dropout", "0.0")], runs_at[("model.dropout", "0.5")]) == (3, 3)
    assert (runs_at[("model.bn_training", "False")], runs_at[("model.bn_training", "None")]) == (5, 1)


@pytest.mark.slow
def test_dropout_effect_is_paired_within_blocks(study, raw):
    effects = pd.read_csv(study[3] / "effects.csv", dtype={"level": str, "reference": str})
    row = effects[(effects["factor"] == "model.dropout") & (effects["metric"] == "val_accuracy")].iloc[0]
    assert (row["level"], row["reference"], row["blocks"]) == ("0.5", "0.0", 2)
    high = _blocks(raw[raw["dropout"] == "0.5"])["val_accuracy"]
    low = _blocks(raw[raw["dropout"] == "0.0"])["val_accuracy"]
    d = high - low  # per block (seed)
    assert row["mean"] == pytest.approx(d.mean(), abs=TOL)
    if d.std() > 0:
        half = T_975[1] * d.std() / math.sqrt(2)
        assert row["ci_low"] == pytest.approx(d.mean() - half, abs=TOL)
        assert row["ci_high"] == pytest.approx(d.mean() + half, abs=TOL)


@pytest.mark.slow
def test_markdown_cells_show_the_same_numbers(study, raw):
    text = _markdown(study)
    values = _blocks(raw[raw["dropout"] == "0.5"])["val_accuracy"]
    mean, sd = values.mean(), values.std()
    half = T_975[1] * sd / math.sqrt(2)
    cell = f"{100 * mean:.1f} ± {100 * sd:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
    if sd == 0:
        cell = f"{100 * mean:.1f} (no variation, 2 blocks)"
    section = text.split("### model.dropout")[1]
    row = next(line for line in section.splitlines() if line.startswith("| val_accuracy |"))
    assert row.split(" | ")[2].rstrip(" |") == cell


def _holm_by_hand(p: dict[str, float]) -> dict[str, float]:
    order = sorted(p, key=p.get)
    out, floor = {}, 0.0
    for i, name in enumerate(order):
        floor = max(floor, min(1.0, (len(order) - i) * p[name]))
        out[name] = floor
    return out


@pytest.mark.slow
def test_gap_components_over_blocks_with_holm_adjusted_p(study, raw):
    gaps = pd.read_csv(study[3] / "gap_components.csv")
    components, total = gaps.iloc[:-1], gaps.iloc[-1]
    assert set(components["component"]) == set(COMPONENTS)
    assert list(components["mean"].abs()) == sorted(components["mean"].abs(), reverse=True)
    blocks = _blocks(raw)
    # the total is what Keras logged, validation minus training accuracy (float32 values: 1 ulp of f32 each)
    assert total["component"] == "total" and total["blocks"] == 2
    expected_total = (blocks["val_accuracy"] - blocks["accuracy"]).mean()
    assert total["mean"] == pytest.approx(expected_total, abs=4 * float(np.finfo(np.float32).eps))
    p = {}
    for row in components.itertuples():
        values = blocks[f"gap/{row.component}"]
        assert row.blocks == 2
        assert row.mean == pytest.approx(values.mean(), abs=TOL)
        half = T_975[1] * values.std() / math.sqrt(2)
        if values.std() > 0:
            assert row.ci_low == pytest.approx(values.mean() - half, abs=TOL)
            # 1 df: the t distribution is Cauchy, two-sided p = 1 - 2 atan(|t|) / pi in closed form
            t = values.mean() / (values.std() / math.sqrt(2))
            p[row.component] = 1 - 2 * math.atan(abs(t)) / math.pi
    holm = _holm_by_hand(p)
    for row in components.itertuples():
        if row.component in p:
            assert row.p == pytest.approx(p[row.component], abs=1e-12)
            assert row.p_holm == pytest.approx(holm[row.component], abs=1e-12)


@pytest.mark.slow
def test_runs_at_chance_are_found_from_the_majority_rate_of_their_split(study, raw):
    table = pd.read_csv(study[3] / "runs.csv").set_index("run_id")
    for row in raw.itertuples():
        got = table.loc[row.run_id]
        assert got["majority"] == pytest.approx(row.majority, abs=TOL) and got["val_count"] == row.val_count
        assert got["block"] == f"seed={row.block}, data.seed={row.block}"
        low, _ = wilson_by_hand(round(row.val_accuracy * row.val_count), row.val_count)
        assert bool(got["at_chance"]) == (low <= row.majority)  # not above the majority rate
    blocks = _blocks(raw)
    count = blocks["val_count"].mean()
    low, _ = wilson_by_hand(round(blocks["val_accuracy"].mean() * count), round(count))
    diff = blocks["val_accuracy"] - blocks["majority"]
    half = T_975[1] * diff.std() / math.sqrt(2)
    study_at_chance = low <= blocks["majority"].mean() or (diff.std() > 0 and diff.mean() - half <= 0)
    text = _markdown(study)
    said = "**At chance: this study's validation accuracy is not distinguishably above" in text
    assert said == study_at_chance
    if study_at_chance:  # said before any component, and every verdict says noise
        assert text.index("**At chance") < text.index("\n## ")
        assert set(pd.read_csv(study[3] / "gap_components.csv")["verdict"]) == {"noise: the model is at chance"}


@pytest.mark.slow
def test_best_and_worst_runs_get_learning_curves(study, raw):
    # copies of one model tie exactly: any of them is the best (or the worst) run
    key = list(zip(raw["val_accuracy"], -raw["val_loss"], strict=True))
    best = {r for r, k in zip(raw["run_id"], key, strict=True) if k == max(key)}
    worst = {r for r, k in zip(raw["run_id"], key, strict=True) if k == min(key)}
    text = _markdown(study)
    assert any(f"- best: run `{r}`" in text for r in best)
    assert any(f"- worst: run `{r}`" in text for r in worst)


@pytest.mark.slow
def test_report_is_logged_to_the_parent_run(study):
    uri, parent, _, _ = study
    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "report")}
    assert {f"report/{name}" for name in FILES} <= names


@pytest.mark.slow
def test_experiment_mode_gives_the_same_numbers(study, tmp_path):
    uri, _, _, out = study
    report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path), "--tracking-uri", uri])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "factors.csv"), pd.read_csv(out / "factors.csv"))
    assert "**6 finished runs** are compared" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_unknown_experiment_is_a_one_line_error_from_the_console_script(study, tmp_path):
    exe = Path(sys.executable).with_name("ablate-report")
    done = subprocess.run(
        [str(exe), "--experiment", "nope", "--out", str(tmp_path), "--tracking-uri", study[0]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no MLflow experiment named 'nope' in {study[0]}: known experiments are Default, study"
    ]

"""``ablate-report`` (issues 6 and 11) on a real small study: 2 replicates (``seed`` and ``data.seed``
together) x 2 dropout levels trained as child runs of a sweep's parent; a run that differs only in
``model.bn_training=null`` (bit-identical to ``false`` in Keras 3: a factor that changes nothing) and a
``resume=false`` rerun of one config (one replicate, not two); plus a failed, a pruned and a running child
that must be counted and left out.

Every number is checked against a computation made here, not by the report: pandas/scipy on the raw
values read back with MlflowClient (distinct runs grouped by their weights hash), the majority-class rate
from Keras's own split of the image folder, the Wilson interval and Holm's adjustment written out by hand,
and the t quantiles from printed tables."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from finetune_ablation import report, report_plots
from finetune_ablation import report_design as rd
from finetune_ablation import report_stats as rs
from finetune_ablation.cli import run_job
from finetune_ablation.diagnostics import COMPONENTS
from finetune_ablation.tracking import ensure_experiment

from .conftest import make_cfg, runs

EXPERIMENT = "study"
SEEDS = (1, 2)
DROPOUTS = ("0.0", "0.5")
# Student t quantiles by degrees of freedom (tables: 12.706, 4.303, 3.182)
T_975 = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.182446305284263}
Z_975 = 1.959963984540054
# Every compared quantity is an accuracy or a difference of accuracies (|x| <= 1) combined from at most a
# dozen doubles by sums, one square root and one quantile: each step adds a few ulp of 1. 4096 ulp leaves
# a wide margin on any IEEE-754 CPU and is still ten orders finer than one image (1/8 of an accuracy here).
TOL = 4096 * math.ulp(1.0)
FILES = (
    "report.md",
    "main_effects.png",
    "gap_decomposition.png",
    "learning_curves.png",
    "factors.csv",
    "gap_components.csv",
    "runs.csv",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory, image_dir):
    """(tracking URI, parent run id, ids of the finished children, report folder)."""
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
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


def _wilson_by_hand(correct: int, n: int) -> tuple[float, float]:
    p, z2 = correct / n, Z_975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


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
                "majority": majority,
                "val_count": val_count,
                **run.data.metrics,
            }
        )
    return pd.DataFrame(rows)


def _distinct(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.groupby("unit").mean(numeric_only=True)


def _markdown(study) -> str:
    return (study[3] / "report.md").read_text()


@pytest.mark.slow
def test_every_file_table_and_plot_is_written(study):
    out = study[3]
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in FILES:
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                assert image.size[0] > 300 and image.size[1] > 200
    text = _markdown(study)
    for heading in ("## Why does validation beat training?", "## Factors", "### model.dropout", "## Learning curves"):
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
def test_first_lines_give_the_replicate_design_and_the_identical_factor(study):
    head = _markdown(study).split("## Why does validation beat training?")[0]
    assert (
        "**Replicate design: 4 distinct runs** out of 6 finished: 1 run repeats the config and seeds of "
        "another run (a rerun is one replicate); 1 run is bit-identical to a run with another config (same "
        "`model.weights_sha256`)."
    ) in head
    assert "`seed` (2 values: weight initialisation, dropout masks and augmentation)" in head
    assert "`data.seed` (2 values: which images are in the validation split, and the shuffle order)" in head
    assert "The validation images change between replicates" in head
    assert "**Identical runs: `model.bn_training` changes nothing**" in head
    section = _markdown(study).split("### model.bn_training")[1].split("###")[0]
    assert "**Identical runs: this factor changes nothing.**" in section
    assert "in every comparison (1) of runs that differ only in `model.bn_training`" in section


@pytest.mark.slow
def test_factor_table_counts_distinct_runs_and_equals_pandas_on_the_raw_runs(study, raw):
    factors = pd.read_csv(
        study[3] / "factors.csv", dtype={"level": str}, keep_default_na=False, na_values=[""]
    ).set_index(["factor", "level", "metric"])
    checked = 0
    for factor, column in (("model.dropout", "dropout"), ("model.bn_training", "bn_training")):
        for level, at_level in raw.groupby(column):
            distinct = _distinct(at_level)
            for metric in report.METRICS:
                got = factors.loc[(factor, level, metric)]
                values = distinct[metric]
                assert got["runs"] == len(at_level) and got["n"] == len(values)
                assert got["mean"] == pytest.approx(values.mean(), abs=TOL)
                if len(values) == 1:  # bn_training=null: one run, no spread, no interval
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
def test_markdown_cells_show_the_same_numbers(study, raw):
    text = _markdown(study)
    values = _distinct(raw[raw["dropout"] == "0.5"])["val_accuracy"]
    mean, sd = values.mean(), values.std()
    half = T_975[1] * sd / math.sqrt(2)
    cell = f"{100 * mean:.1f} ± {100 * sd:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}] (n=2)"
    if sd == 0:
        cell = f"{100 * mean:.1f} (no variation, n=2)"
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
def test_gap_components_over_distinct_runs_with_holm_adjusted_p(study, raw):
    gaps = pd.read_csv(study[3] / "gap_components.csv")
    components, total = gaps.iloc[:-1], gaps.iloc[-1]
    assert set(components["component"]) == set(COMPONENTS)
    assert list(components["mean"].abs()) == sorted(components["mean"].abs(), reverse=True)
    distinct = _distinct(raw)
    # the total is what Keras logged, validation minus training accuracy (float32 values: 1 ulp of f32 each)
    assert total["component"] == "total"
    expected_total = (distinct["val_accuracy"] - distinct["accuracy"]).mean()
    assert total["mean"] == pytest.approx(expected_total, abs=4 * np.finfo(np.float32).eps)
    p = {}
    for row in components.itertuples():
        values = distinct[f"gap/{row.component}"]
        assert row.n == 4
        assert row.mean == pytest.approx(values.mean(), abs=TOL)
        half = T_975[3] * values.std() / 2
        assert row.ci_low == pytest.approx(values.mean() - half, abs=TOL)
        if values.std() > 0:
            p[row.component] = 2 * (1 - rs.stats.t.cdf(abs(values.mean() / (values.std() / 2)), df=3))
    holm = _holm_by_hand(p)
    for row in components.itertuples():
        if row.component in p:
            # t.cdf near 1 loses the tail's digits below 1e-16: compare p-values to that absolute precision
            assert row.p == pytest.approx(p[row.component], abs=1e-12)
            assert row.p_holm == pytest.approx(holm[row.component], abs=1e-12)


@pytest.mark.slow
def test_runs_at_chance_are_found_from_the_majority_rate_of_their_split(study, raw):
    table = pd.read_csv(study[3] / "runs.csv").set_index("run_id")
    for row in raw.itertuples():
        got = table.loc[row.run_id]
        assert got["majority"] == pytest.approx(row.majority, abs=TOL) and got["val_count"] == row.val_count
        low, _ = _wilson_by_hand(round(row.val_accuracy * row.val_count), row.val_count)
        assert bool(got["at_chance"]) == (low <= row.majority)  # not above the majority rate
    distinct = _distinct(raw)
    count = distinct["val_count"].mean()
    low, _ = _wilson_by_hand(round(distinct["val_accuracy"].mean() * count), round(count))
    diff = distinct["val_accuracy"] - distinct["majority"]
    half = T_975[3] * diff.std() / 2
    study_at_chance = low <= distinct["majority"].mean() or (diff.std() > 0 and diff.mean() - half <= 0)
    text = _markdown(study)
    said = "**At chance: this study's validation accuracy is not distinguishably above" in text
    assert said == study_at_chance
    if study_at_chance:  # said before any component, and every verdict says noise
        assert text.index("**At chance") < text.index("## Why does validation beat training?")
        assert set(pd.read_csv(study[3] / "gap_components.csv")["verdict"]) == {"noise: the model is at chance"}


@pytest.mark.slow
def test_best_and_worst_runs_get_learning_curves(study, raw):
    ranked = raw.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable")
    text = _markdown(study)
    assert f"- best: run `{ranked['run_id'].iloc[0]}`" in text
    assert f"- worst: run `{ranked['run_id'].iloc[-1]}`" in text


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


# --- the statistics by hand (no training) -------------------------------------------------------------


def test_interval_on_a_hand_checked_case():
    s = rs.summarize([0.5, 0.7, 0.6])
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(0.6, abs=TOL), pytest.approx(0.1, abs=TOL))
    # 0.6 ± 4.3027 * 0.1 / sqrt(3) = 0.6 ± 0.248414 (six printed decimals: compared to 1e-6)
    assert s.ci_low == pytest.approx(0.351586, abs=1e-6) and s.ci_high == pytest.approx(0.848414, abs=1e-6)
    two = rs.summarize([0.5, 0.7, math.nan])  # missing values are left out: n = 2, t = 12.706
    assert two.ci_low == pytest.approx(0.6 - 1.270620, abs=1e-6)
    assert math.isnan(rs.summarize([0.4]).sd)  # one run: no spread, no interval
    assert rs.summarize([]).n == 0


def _p_two_df(t: float) -> float:
    """Two-sided p of Student t on 2 degrees of freedom, in closed form: 1 - t / sqrt(t^2 + 2)."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_p_values_and_holm_on_a_hand_checked_case():
    # t = 0.04 / (0.01 / sqrt(3)) = sqrt(48) on 2 df: p = 1 - sqrt(48 / 50) = 0.020204
    s = rs.summarize([0.03, 0.04, 0.05])
    assert rs.p_value(s) == pytest.approx(_p_two_df(math.sqrt(48)), abs=1e-9)
    # Holm: sorted 0.01, 0.02, 0.04 times 3, 2, 1 = 0.03, 0.04, 0.04 (running max); NaN is not a test
    assert rs.holm([0.04, math.nan, 0.01, 0.02]) == pytest.approx([0.04, math.nan, 0.03, 0.04], nan_ok=True)
    assert rs.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_verdicts():
    assert rs.verdict(rs.summarize([0.04, 0.05, 0.03])) == "real"
    assert rs.verdict(rs.summarize([0.04, -0.05, 0.03])) == "not distinguishable from zero"
    assert rs.verdict(rs.summarize([0.0, 0.0])) == "absent: exactly 0 in every run"
    assert rs.verdict(rs.summarize([0.03, 0.03, 0.03])) == "no variation: the same value in all 3 runs, so no interval"
    assert rs.verdict(rs.summarize([0.1])).startswith("one run only")
    assert rs.verdict(rs.summarize([0.04, 0.05, 0.03]), p_adjusted=0.06, tests=5) == (
        "interval excludes zero, but not after Holm's correction for 5 tests"
    )


def test_gap_ranking_adjusts_for_the_components_tested_together():
    # p by hand (2 df): a = [.03,.04,.05]: t^2 = 48, p = 0.020204; b = [.10,.11,.12]: t^2 = 363,
    # p = 0.0027435; c varies in sign -> large p; d is constant (no test). Holm over 3 tests:
    # b 3 * 0.0027435 = 0.0082305, a 2 * 0.020204 = 0.040408 -> both real; c stays not distinguishable.
    values = pd.DataFrame(
        {"a": [0.03, 0.04, 0.05], "b": [0.10, 0.11, 0.12], "c": [0.02, -0.03, 0.01], "d": [0.02, 0.02, 0.02]}
    )
    ranking = rs.gap_ranking(values, ["a", "b", "c", "d"]).set_index("component")
    # sd computed from these decimals differs from 0.01 by ~1e-17: the p-values keep ~1e-12
    assert ranking.loc["b", "p_holm"] == pytest.approx(3 * _p_two_df(math.sqrt(363)), abs=1e-9)
    assert ranking.loc["a", "p_holm"] == pytest.approx(2 * _p_two_df(math.sqrt(48)), abs=1e-9)
    assert ranking.loc["a", "verdict"] == ranking.loc["b", "verdict"] == "real"
    assert ranking.loc["c", "verdict"] == "not distinguishable from zero"
    assert ranking.loc["d", "verdict"].startswith("no variation")
    assert math.isnan(ranking.loc["d", "p_holm"])


def _frame(**columns) -> pd.DataFrame:
    return pd.DataFrame({k.replace("__", "."): v for k, v in columns.items()})


def test_reruns_and_identical_models_are_one_distinct_run():
    runs = _frame(
        params__seed=["1", "1", "2", "1", "2"],
        params__model__dropout=["0.5", "0.5", "0.5", "0.0", "0.0"],
        params__tracking__run_name=["a", "b", "c", "d", "e"],  # bookkeeping: not part of the config
        tags__model__weights_sha256=["h1", "h1-rerun-changed", "h2", "h1", "h3"],
    )
    units = rd.unit_ids(runs)
    # 0 and 1: same config and seed (a rerun, even with another hash); 3 is bit-identical to 0
    assert units.tolist() == [0, 0, 1, 0, 2]
    assert rd.merges(runs, units) == rd.Merges(runs=5, units=3, reruns=1, identical=1)


def test_a_factor_with_bit_identical_levels_changes_nothing():
    runs = _frame(
        params__seed=["1", "1", "2", "2", "3"],
        params__model__bn_training=["False", "None", "False", "None", "False"],
        params__model__freeze_bn=["False", "False", "False", "False", "True"],
        tags__model__weights_sha256=["h1", "h1", "h2", "h2", "h3"],
    )
    factors = {f.name: f for f in rs.find_factors(runs)}
    identity = rd.factor_identity(runs, factors["model.bn_training"])
    assert (identity.identical, identity.compared, identity.changes_nothing) == (2, 2, True)
    partial = _frame(
        params__seed=["1", "1", "2", "2"],
        params__model__freeze_bn=["False", "True", "False", "True"],
        params__model__fine_tune_at=["154", "154", "100", "100"],  # nothing unfrozen at 154: freeze_bn is moot
        tags__model__weights_sha256=["h1", "h1", "h2", "h3"],
    )
    factors = {f.name: f for f in rs.find_factors(partial)}
    identity = rd.factor_identity(partial, factors["model.freeze_bn"])
    assert (identity.identical, identity.compared, identity.changes_nothing) == (1, 2, False)


def test_replicate_design_says_which_noise_an_interval_covers():
    fixed_split = rd.replicate_design(_frame(params__seed=["1", "2", "3"], params__data__seed=["42"] * 3))
    assert fixed_split == rd.Design({"seed": 3}, {"data.seed": "42"})
    sentence = rd.covers_sentence(fixed_split)
    assert "`data.seed` is 42 in every run: the split is fixed" in sentence
    assert "a `split` verdict is about these validation images, not unseen ones" in sentence
    both = rd.replicate_design(_frame(params__seed=["1", "2"], params__data__seed=["1", "2"]))
    assert "The validation images change between replicates" in rd.covers_sentence(both)
    assert rs.find_factors(_frame(params__seed=["1", "2"], params__data__seed=["1", "2"])) == []


def test_wilson_and_chance_against_the_formula_by_hand():
    for correct, n in ((5, 8), (0, 8), (8, 8), (40, 65)):
        low, high = rd.wilson(correct / n, n)
        hand = _wilson_by_hand(correct, n)
        assert (low, high) == (pytest.approx(hand[0], abs=TOL), pytest.approx(hand[1], abs=TOL))
    # the issue's case: 0.585 on 65 images against a majority of 0.615 is at chance
    assert rd.run_at_chance(38 / 65, 40 / 65, 65) is True
    assert rd.run_at_chance(60 / 65, 40 / 65, 65) is False
    assert rd.run_at_chance(10 / 65, 40 / 65, 65) is True  # below the majority rate: learnt nothing either
    # three runs just above the majority, by a consistent 0.03: t says "above", but one split of 65
    # images cannot tell 0.645 from 0.615 (Wilson), so the level is at chance
    acc = pd.Series([0.64, 0.645, 0.65])
    assert rd.at_chance(acc, pd.Series([0.615] * 3), pd.Series([65] * 3)) is True
    assert rd.at_chance(pd.Series([0.95, 0.93]), pd.Series([0.615] * 2), pd.Series([65] * 2)) is False
    runs = _frame(params__data__count__val__a=["40", "30"], params__data__count__val__b=["25", "35"])
    runs["params.data.count.val.total"] = ["65", "65"]
    rates = rd.majority_rates(runs)
    assert rates["majority"].tolist() == pytest.approx([40 / 65, 35 / 65], abs=TOL)
    assert rates["val_count"].tolist() == [65, 65]


def test_levels_with_one_run_get_no_error_bar():
    table = pd.DataFrame(
        [
            {"level": lv, "metric": m, "runs": n, "n": n, "mean": 0.6, "sd": sd, "ci_low": lo, "ci_high": hi}
            for lv, n, sd, lo, hi in (("a", 1, math.nan, math.nan, math.nan), ("b", 3, 0.1, 0.35, 0.85))
            for m in report_plots.MAIN_EFFECT_METRICS
        ]
    )
    fig = report_plots.main_effects({"f": table}, {"f": {"a": None, "b": None}}, None)
    ax = fig.axes[0]
    bars = [c for c in ax.collections if c.get_segments()]
    # one vertical bar per metric, at level b only (x = 1 plus the metric's offset)
    assert sum(len(c.get_segments()) for c in bars) == len(report_plots.MAIN_EFFECT_METRICS)
    assert all(abs(seg[0][0] - 1) < 0.1 for c in bars for seg in c.get_segments())
    assert [t.get_text() for t in ax.texts] == ["n=1"]
    plt.close(fig)


def test_classify_runs():
    frame = pd.DataFrame(
        {
            "status": ["FINISHED", "FAILED", "KILLED", "RUNNING", "FINISHED", "FINISHED", "RUNNING"],
            "tags.pruned": [None, None, None, None, "true", None, None],
            "tags.reproduced_from": [None, None, None, None, None, "abc", None],
            "tags.sweep.role": [None, None, None, None, None, None, "parent"],
        }
    )
    kinds = ["finished", "failed", "failed", "running", "pruned", "reproduction", "parent"]
    assert rs.classify(frame).tolist() == kinds


def test_group_choice_is_one_factor_and_numeric_levels_sort_as_numbers():
    frame = pd.DataFrame(
        {
            "tags.hydra.overrides": ["augment=none seed=1", "augment=strong seed=1", "augment=none", "augment=strong"],
            "params.augment.rotation": ["0.0", "0.3", "0.0", "0.3"],
            "params.augment.zoom": ["0.0", "0.2", "0.0", "0.2"],
            "params.train.fine_tune_lr": ["1e-05", "0.0001", "0.0001", "1e-05"],
            "params.seed": ["1", "1", "2", "2"],
            "params.tracking.run_name": ["a", "b", "c", "d"],
        }
    )
    factors = rs.find_factors(frame, ["augment", "model"])
    assert [f.name for f in factors] == ["augment", "train.fine_tune_lr"]
    assert factors[0].covers == ("augment.rotation", "augment.zoom") and factors[0].order == ("none", "strong")
    assert factors[1].order == ("1e-05", "0.0001")


def test_many_numeric_levels_are_binned():
    frame = pd.DataFrame({"params.train.fine_tune_lr": [str(10 ** (-5 + i / 4)) for i in range(12)]})
    (factor,) = rs.find_factors(frame)
    assert len(factor.order) == rs.BINS and factor.note.startswith("12 values")


def test_report_names_the_same_components_and_tags_as_the_training():
    assert tuple(COMPONENTS) == report.GAP_COMPONENTS
    train_source = Path(sys.modules["finetune_ablation.cli"].__file__).with_name("train.py").read_text()
    assert f'"{rd.WEIGHTS_TAG}"' in train_source and '"data.count.' in train_source

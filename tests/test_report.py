"""``ablate-report`` (issue 6) on a real small study: 2 seeds x 2 dropout levels trained as child runs
of a sweep's parent, plus a failed, a pruned and a running child that must be counted and left out.

The report's numbers are checked against pandas computed here from the raw runs (MlflowClient, not the
report's own reading), and its intervals against values worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from finetune_ablation import report
from finetune_ablation import report_stats as rs
from finetune_ablation.cli import run_job
from finetune_ablation.diagnostics import COMPONENTS
from finetune_ablation.tracking import ensure_experiment

from .conftest import make_cfg, runs

pytestmark = pytest.mark.slow

EXPERIMENT = "study"
SEEDS = (1, 2)
DROPOUTS = ("0.0", "0.5")
# Student t quantiles by degrees of freedom (tables: 12.706, 4.303, 3.182)
T_975 = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.182446305284263}
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
            assert job(f"seed={seed}", f"model.dropout={dropout}") is not None
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


@pytest.fixture(scope="module")
def raw(study) -> pd.DataFrame:
    """The finished children as pandas rows, read straight from MLflow."""
    uri, _, finished, _ = study
    client = mlflow.MlflowClient(uri)
    rows = []
    for run_id in finished:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        rows.append({"run_id": run_id, "dropout": run.data.params["model.dropout"], **run.data.metrics})
    return pd.DataFrame(rows)


def _markdown(study) -> str:
    return (study[3] / "report.md").read_text()


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


def test_failed_pruned_and_running_runs_are_counted_and_left_out(study):
    text = _markdown(study)
    assert "**4 finished runs** are compared" in text
    assert "1 failed or killed, 1 pruned, 1 still running" in text
    assert "`model.dropout` (2 levels)" in text and "`seed` (2 values)" in text
    factors = pd.read_csv(study[3] / "factors.csv", dtype={"level": str})
    assert set(factors["factor"]) == {"model.dropout"}  # seed is the replicate, not a factor
    assert sorted(set(factors["level"])) == list(DROPOUTS)  # neither 0.95 (failed) nor 0.9 (pruned/running)
    assert sorted(pd.read_csv(study[3] / "runs.csv")["run_id"]) == sorted(study[2])


def test_factor_table_equals_pandas_on_the_raw_runs(study, raw):
    factors = pd.read_csv(study[3] / "factors.csv", dtype={"level": str}).set_index(["level", "metric"])
    checked = 0
    for metric in report.METRICS:
        expected = raw.groupby("dropout")[metric].agg(["mean", "std", "count"])
        for level, row in expected.iterrows():
            got = factors.loc[(level, metric)]
            assert got["n"] == row["count"] == 2 and got["runs"] == 2
            assert got["mean"] == pytest.approx(row["mean"], abs=1e-12)
            assert got["sd"] == pytest.approx(row["std"], abs=1e-12)
            half = T_975[1] * row["std"] / math.sqrt(2)
            assert got["ci_low"] == pytest.approx(row["mean"] - half, abs=1e-12)
            assert got["ci_high"] == pytest.approx(row["mean"] + half, abs=1e-12)
            checked += 1
    assert checked == 2 * len(report.METRICS)


def test_markdown_cells_show_the_same_numbers(study, raw):
    text = _markdown(study)
    values = raw[raw["dropout"] == "0.5"]["val_accuracy"]
    mean, sd = values.mean(), values.std()
    half = T_975[1] * sd / math.sqrt(2)
    cell = f"{100 * mean:.1f} ± {100 * sd:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
    row = next(line for line in text.splitlines() if line.startswith("| val_accuracy |"))
    assert row.split(" | ")[2].rstrip(" |") == cell


def test_gap_components_are_ranked_with_intervals_and_verdicts(study, raw):
    gaps = pd.read_csv(study[3] / "gap_components.csv")
    components, total = gaps.iloc[:-1], gaps.iloc[-1]
    assert set(components["component"]) == set(COMPONENTS)
    assert list(components["mean"].abs()) == sorted(components["mean"].abs(), reverse=True)
    assert total["component"] == "total"
    assert total["mean"] == pytest.approx(raw["gap/total"].mean(), abs=1e-12)
    assert components["mean"].sum() == pytest.approx(total["mean"], abs=1e-9)  # the parts add up
    text = _markdown(study)
    for row in gaps.itertuples():
        s = rs.summarize(raw[f"gap/{row.component}"])
        assert row.n == 4 and row.verdict == rs.verdict(s)
        values = raw[f"gap/{row.component}"]
        assert row.mean == pytest.approx(values.mean(), abs=1e-12)
        assert row.ci_low == pytest.approx(values.mean() - T_975[3] * values.std() / 2, abs=1e-12)
        line = f"- **{row.component}**: {100 * s.mean:+.1f} points [{100 * s.ci_low:+.1f}, {100 * s.ci_high:+.1f}]"
        assert f"{line} — {row.verdict}" in text


def test_best_and_worst_runs_get_learning_curves(study, raw):
    ranked = raw.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable")
    text = _markdown(study)
    assert f"- best: run `{ranked['run_id'].iloc[0]}`" in text
    assert f"- worst: run `{ranked['run_id'].iloc[-1]}`" in text


def test_report_is_logged_to_the_parent_run(study):
    uri, parent, _, _ = study
    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "report")}
    assert {f"report/{name}" for name in FILES} <= names


def test_experiment_mode_gives_the_same_numbers(study, tmp_path):
    uri, _, _, out = study
    report.main(["--experiment", EXPERIMENT, "--out", str(tmp_path), "--tracking-uri", uri])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "factors.csv"), pd.read_csv(out / "factors.csv"))
    assert "**4 finished runs** are compared" in (tmp_path / "report.md").read_text()


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
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(0.6), pytest.approx(0.1))
    # 0.6 ± 4.3027 * 0.1 / sqrt(3) = 0.6 ± 0.248414
    assert s.ci_low == pytest.approx(0.351586, abs=1e-6) and s.ci_high == pytest.approx(0.848414, abs=1e-6)
    two = rs.summarize([0.5, 0.7, math.nan])  # missing values are left out: n = 2, t = 12.706
    assert two.ci_low == pytest.approx(0.6 - 1.270620, abs=1e-6)
    assert rs.summarize([0.4]).sd != rs.summarize([0.4]).sd  # one run: no spread, no interval
    assert rs.summarize([]).n == 0


def test_verdicts():
    assert rs.verdict(rs.summarize([0.04, 0.05, 0.03])) == "real"
    assert rs.verdict(rs.summarize([0.04, -0.05, 0.03])) == "not distinguishable from zero"
    assert rs.verdict(rs.summarize([0.0, 0.0])) == "absent: exactly 0 in every run"
    assert rs.verdict(rs.summarize([0.1])).startswith("one run only")


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


def test_report_names_the_same_components_as_the_diagnostics():
    assert tuple(COMPONENTS) == report.GAP_COMPONENTS

"""The report's statistics and evidence rules by hand, without training (issue 11): intervals, p-values
and Holm's adjustment against closed forms, distinct runs, identical factors, the replicate design, the
Wilson interval and chance level against the formula, and no error bar for one run.

Expected values are worked out here (closed forms, printed tables), never by the functions under test."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from finetune_ablation.gap.decomposition import COMPONENTS
from finetune_ablation.report import app as report
from finetune_ablation.report import design as rd
from finetune_ablation.report import plots as report_plots
from finetune_ablation.report import stats as rs

from .test_report import TOL, _wilson_by_hand


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
    train_source = (Path(sys.modules["finetune_ablation.record"].__file__).parent / "run" / "train.py").read_text()
    assert "rec.WEIGHTS_DIGEST_TAG" in train_source and "rec.DATA_COUNT_PARAM_PREFIX" in train_source

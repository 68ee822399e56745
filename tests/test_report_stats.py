"""The report's statistics and evidence rules by hand, without training (issues 11 and 33): intervals,
p-values and Holm's adjustment against closed forms, distinct runs, independent blocks, block means (an
unbalanced block filled by the additive model), within-block effects and the block ANOVA, the replicate
design, the Wilson interval and chance level against the formula, the headings that follow the sign of
the gap, and no error bar for one block.

Expected values are worked out here (closed forms, printed tables), never by the functions under test."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from finetune_ablation import chance
from finetune_ablation.console import gap_leader
from finetune_ablation.gap.decomposition import COMPONENTS
from finetune_ablation.report import app as report
from finetune_ablation.report import blocked
from finetune_ablation.report import design as rd
from finetune_ablation.report import plots as report_plots
from finetune_ablation.report import stats as rs
from finetune_ablation.report import text as report_text

from .helpers import T_975, TOL, wilson_by_hand


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
    assert rs.verdict(rs.summarize([0.0, 0.0])) == "absent: exactly 0 in every block"
    constant = "no variation: the same value in all 3 blocks, so no interval"
    assert rs.verdict(rs.summarize([0.03, 0.03, 0.03])) == constant
    assert rs.verdict(rs.summarize([0.1])) == "one block only: no interval, repeat over more seeds"
    assert rs.verdict(rs.summarize([0.04, 0.05, 0.03]), p_adjusted=0.06, tests=5) == (
        "interval excludes zero, but not after Holm's correction for 5 tests"
    )


def test_gap_ranking_adjusts_for_the_components_tested_together():
    # three blocks' means (one row per block). p by hand (2 df): a = [.03,.04,.05]: t^2 = 48, p = 0.020204;
    # b = [.10,.11,.12]: t^2 = 363, p = 0.0027435; c varies in sign -> large p; d is constant (no test).
    # Holm over 3 tests: b 3 * 0.0027435 = 0.0082305, a 2 * 0.020204 = 0.040408 -> both real.
    values = pd.DataFrame(
        {"a": [0.03, 0.04, 0.05], "b": [0.10, 0.11, 0.12], "c": [0.02, -0.03, 0.01], "d": [0.02, 0.02, 0.02]}
    )
    ranking = blocked.gap_ranking(values, ["a", "b", "c", "d"]).set_index("component")
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
        low, high = chance.wilson_interval(correct, n)
        hand = wilson_by_hand(correct, n)
        assert (low, high) == (pytest.approx(hand[0], abs=TOL), pytest.approx(hand[1], abs=TOL))
        assert chance.accuracy_interval(correct / n, n) == (low, high)
    # the issue's case: 0.585 on 65 images against a majority of 0.615 is at chance
    assert chance.at_chance(38 / 65, 65, 40 / 65) is True
    assert chance.at_chance(60 / 65, 65, 40 / 65) is False
    assert chance.at_chance(10 / 65, 65, 40 / 65) is True  # below the majority rate: learnt nothing either
    assert chance.at_chance(math.nan, 65, 0.5) is None and chance.at_chance(0.9, 0, 0.5) is None
    runs = _frame(params__data__count__val__a=["40", "30"], params__data__count__val__b=["25", "35"])
    runs["params.data.count.val.total"] = ["65", "65"]
    rates = rd.majority_rates(runs)
    assert rates["majority"].tolist() == pytest.approx([40 / 65, 35 / 65], abs=TOL)
    assert rates["val_count"].tolist() == [65, 65]


def _block_means(acc: list[float], majority: float = 0.615, count: float = 65) -> pd.DataFrame:
    """A group's block means as ``blocked.block_table`` gives them: one row per block."""
    frame = pd.DataFrame({"val_accuracy": acc, "majority": majority, "val_count": count})
    frame[rd.ABOVE_MAJORITY] = frame["val_accuracy"] - frame["majority"]
    return frame


def test_a_group_is_at_chance_over_its_blocks():
    # three blocks just above the majority, by a consistent 0.03: t says "above", but one split of 65
    # images cannot tell 0.645 from 0.615 (Wilson), so the level is at chance
    assert rd.at_chance(_block_means([0.64, 0.645, 0.65])) is True
    assert rd.at_chance(_block_means([0.95, 0.93])) is False
    # well above on the pooled images (0.80 vs 0.615 on 650), but over 3 blocks the interval of
    # accuracy - majority is 0.185 ± 4.303 * sd / sqrt(3) with sd = 0.26: it reaches below zero
    above = pd.Series([0.50, 0.65, 1.25]) - 0.615
    assert above.mean() - T_975[2] * above.std() / math.sqrt(3) < 0  # the premise, by hand
    assert rd.at_chance(_block_means([0.50, 0.65, 1.25], count=650)) is True


def _study(**columns) -> pd.DataFrame:
    frame = _frame(**columns)
    frame["params.tracking.run_name"] = [f"r{i}" for i in range(len(frame))]  # bookkeeping, not config
    return frame


def test_runs_that_share_a_varying_seed_are_one_block():
    paired = _study(params__seed=["1", "1", "2", "2", "3"], params__data__seed=["1", "1", "2", "2", "3"],
                    params__model__dropout=["0", "0.2", "0", "0.2", "0"])  # fmt: skip
    blocks = rd.block_ids(paired, rd.unit_ids(paired))
    assert blocks.ids.tolist() == [0, 0, 1, 1, 2] and blocks.keys == ("seed", "data.seed")
    assert (blocks.count, blocks.merged, blocks.missing) == (3, False, {2: 1})  # seed 3 lacks dropout=0.2
    assert blocks.labels == {0: "seed=1, data.seed=1", 1: "seed=2, data.seed=2", 2: "seed=3, data.seed=3"}
    # a fixed split is conditioned on, not shared noise: blocks by seed alone
    fixed = _study(params__seed=["2", "10", "2", "10"], params__data__seed=["42"] * 4,
                   params__model__dropout=["0", "0", "0.2", "0.2"])  # fmt: skip
    blocks = rd.block_ids(fixed, rd.unit_ids(fixed))
    assert blocks.ids.tolist() == [0, 1, 0, 1] and blocks.keys == ("seed",)  # numbered 2 before 10
    # seed crossed with data.seed: (1,1) shares seed 1 with (1,2), which shares data.seed 2 with (2,2)...
    crossed = _study(params__seed=["1", "1", "2", "2"], params__data__seed=["1", "2", "1", "2"])
    blocks = rd.block_ids(crossed, rd.unit_ids(crossed))
    assert (blocks.count, blocks.combinations, blocks.merged) == (1, 4, True)
    # two pairs that share nothing are two blocks
    two = _study(params__seed=["1", "1", "2", "2"], params__data__seed=["1", "3", "2", "4"])
    assert rd.block_ids(two, rd.unit_ids(two)).ids.tolist() == [0, 0, 1, 1]
    # nothing varies: one block
    same = _study(params__seed=["1", "1"], params__model__dropout=["0", "0.2"])
    assert rd.block_ids(same, rd.unit_ids(same)).count == 1


def _layout(blocks: list[int], cells: list[str], units: list[int] | None = None) -> blocked.Layout:
    index = pd.RangeIndex(len(blocks))
    units = units if units is not None else list(range(len(blocks)))
    return blocked.Layout(pd.Series(units, index=index), pd.Series(blocks, index=index), pd.Series(cells, index=index))


def test_block_means_average_within_blocks_first_and_merge_copies():
    # block 0: cell a twice as one distinct run (a copy: 0.10 and 0.30 -> 0.20), cell b 0.40 -> 0.30;
    # block 1: a 0.50, b 0.70 -> 0.60; block 2: a 0.20, b 0.20 -> 0.20. Over blocks: mean 1.1 / 3,
    # sd of [0.3, 0.6, 0.2], interval with t(2) = 4.3027 by hand
    layout = _layout([0, 0, 0, 1, 1, 2, 2], ["a", "a", "b", "a", "b", "a", "b"], [0, 0, 1, 2, 3, 4, 5])
    values = pd.Series([0.10, 0.30, 0.40, 0.50, 0.70, 0.20, 0.20])
    s = blocked.over_blocks(values, layout)
    means = [0.3, 0.6, 0.2]
    sd = pd.Series(means).std()
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(1.1 / 3, abs=TOL), pytest.approx(sd, abs=TOL))
    assert s.ci_high == pytest.approx(1.1 / 3 + T_975[2] * sd / math.sqrt(3), abs=TOL)


def test_a_block_missing_a_config_gets_it_from_the_additive_model():
    # cells a and b; blocks 0 and 1 ran both (b - a = 0.10 and 0.30), block 2 ran only a = 0.50.
    # Least squares of cell + block: block 2's single value fixes its block effect, the cell effect
    # comes from the complete blocks: b - a = 0.20, so block 2's b is 0.70 and its mean 0.60 (not 0.50,
    # which would pass a missing config off as block-to-block noise).
    layout = _layout([0, 0, 1, 1, 2], ["a", "b", "a", "b", "a"])
    values = pd.DataFrame({"m": [0.10, 0.20, 0.30, 0.60, 0.50]})
    means = blocked.block_table(values, layout)["m"]
    assert means.tolist() == pytest.approx([0.15, 0.45, 0.60], abs=TOL)
    # blocks without a config in common: the additive model is not determined, each block keeps its own
    apart = blocked.block_table(pd.DataFrame({"m": [0.10, 0.30]}), _layout([0, 1], ["a", "b"]))["m"]
    assert apart.tolist() == [0.10, 0.30]
    # a component that is exactly 0 everywhere stays exactly 0 (no least-squares round-off)
    zero = blocked.block_table(pd.DataFrame({"m": [0.0] * 5}), layout)["m"]
    assert zero.tolist() == [0.0, 0.0, 0.0]


def _levels(values: list[float], blocks: list[int], levels: list[str]) -> blocked.Levels:
    index = pd.RangeIndex(len(values))
    factor = rs.Factor("f", pd.Series(levels, index=index), tuple(dict.fromkeys(levels)))
    layout = _layout(blocks, levels)
    return blocked.levels_of(pd.DataFrame({"m": values}), factor, layout)


def test_within_block_effects_and_the_block_anova_by_hand():
    # 3 blocks x levels x, y, z. The block effect (0, +0.3, -0.2) cancels in the within-block contrasts:
    # y - x = 0.05, 0.07, 0.06 (mean 0.06, sd 0.01); z - x = 0.00, 0.02, -0.02.
    x = [0.50, 0.80, 0.30]
    y = [0.55, 0.87, 0.36]
    z = [0.50, 0.82, 0.28]
    levels = _levels([*x, *y, *z], [0, 1, 2] * 3, ["x"] * 3 + ["y"] * 3 + ["z"] * 3)
    effects = blocked.effects_table(levels, ["m"]).set_index("level")
    d = pd.Series(y) - pd.Series(x)
    half = T_975[2] * d.std() / math.sqrt(3)
    assert effects.loc["y", "mean"] == pytest.approx(0.06, abs=TOL)
    assert effects.loc["y", "ci_low"] == pytest.approx(0.06 - half, abs=TOL)
    t = 0.06 / (d.std() / math.sqrt(3))
    assert effects.loc["y", "p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-9)  # closed form, 2 df
    # the randomized complete block ANOVA by hand: SS_level = b * sum (level mean - grand)^2, SS_block =
    # k * sum (block mean - grand)^2, SS_error = SS_total - both; F on (k-1, (k-1)(b-1)) = (2, 4) df,
    # whose upper tail is (1 + F/2)^-2 in closed form
    table = pd.DataFrame({"x": x, "y": y, "z": z})
    grand = table.to_numpy().mean()
    ss_level = 3 * ((table.mean(axis=0) - grand) ** 2).sum()
    ss_block = 3 * ((table.mean(axis=1) - grand) ** 2).sum()
    ss_error = ((table - grand) ** 2).to_numpy().sum() - ss_level - ss_block
    f = (ss_level / 2) / (ss_error / 4)
    assert effects.loc["y", "anova_p"] == pytest.approx((1 + f / 2) ** -2, abs=1e-9)
    # two levels: the F test is the paired t-test (F = t^2), and a level's table is over its blocks
    two = blocked.effects_table(_levels([*x, *y], [0, 1, 2] * 2, ["x"] * 3 + ["y"] * 3), ["m"])
    assert two["anova_p"].iloc[0] == pytest.approx(two["p"].iloc[0], abs=1e-12)
    rows = blocked.factor_table(levels, ["m"]).set_index("level")
    assert rows.loc["x", "blocks"] == 3 and rows.loc["x", "mean"] == pytest.approx(sum(x) / 3, abs=TOL)


def test_how_many_blocks_a_precision_needs():
    # half-width t(k-1) * sd / sqrt(k), t from printed tables: sd 0.02 -> 3 blocks 0.049683, 4: 0.031824,
    # 5: 0.024833; the first at most 0.025 is 5, at most 0.0319 is 4, at most 0.0318 is 5
    assert blocked.half_width(0.02, 3) == pytest.approx(T_975[2] * 0.02 / math.sqrt(3), abs=TOL)
    assert blocked.half_width(0.02, 4) == pytest.approx(T_975[3] * 0.02 / 2, abs=TOL)
    assert blocked.blocks_for(0.02, 0.025) == 5
    assert blocked.blocks_for(0.02, 0.0319) == 4
    assert blocked.blocks_for(0.02, 0.0318) == 5
    assert blocked.blocks_for(1.0, 1e-6) is None


def test_headings_follow_the_sign_of_the_total():
    assert gap_leader(0.031) == "validation beats training"
    assert gap_leader(-0.031) == "training beats validation"
    assert gap_leader(0.0004) == gap_leader(-0.0004) == "level"  # prints as 0.0 points
    assert report_text.gap_heading(-0.031) == "Why does training beat validation?"
    assert report_text.gap_heading(0.0004) == "Validation and training are level: what is in the gap?"
    ranking = pd.DataFrame(
        [{"component": "lag", "blocks": 3, "mean": -0.01, "sd": 0.01, "ci_low": -0.03, "ci_high": 0.01,
          "p": 0.2, "p_holm": 0.2, "verdict": "not distinguishable from zero"}]
    )  # fmt: skip
    total = pd.Series({**ranking.iloc[0].to_dict(), "component": "total", "mean": -0.02})
    fig = report_plots.gap_bars(ranking, total, False)
    assert fig.axes[0].get_title().startswith("Why training beats validation")
    plt.close(fig)
    lines = report_text.gap_markdown(ranking, total, False, False)
    assert lines[0] == "## Why does training beat validation?"
    assert "training beats validation by 2.0 points" in lines[2]


def test_levels_with_one_block_get_no_error_bar():
    table = pd.DataFrame(
        [
            {"level": lv, "metric": m, "runs": n, "blocks": n, "mean": 0.6, "sd": sd, "ci_low": lo, "ci_high": hi}
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
    assert [t.get_text() for t in ax.texts] == ["1 block"]
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


def test_the_first_lines_state_the_design_found():
    unbalanced = _study(params__seed=["1", "1", "2", "2", "3"], params__data__seed=["1", "1", "2", "2", "3"],
                        params__model__dropout=["0", "0.2", "0", "0.2", "0"])  # fmt: skip
    factors = rs.find_factors(unbalanced)
    blocks = rd.block_ids(unbalanced, rd.unit_ids(unbalanced))
    text = "\n".join(report_text.design_found_lines(factors, 2, blocks, rd.replicate_design(unbalanced)))
    assert "Factors: `model.dropout` (2 levels); 2 configs." in text
    assert "`seed` (3 values), `data.seed` (3 values), paired (one `data.seed` per `seed`)" in text
    assert "**3 independent blocks** (`seed=1, data.seed=1`; `seed=2, data.seed=2`; `seed=3, data.seed=3`)." in text
    assert "**Unbalanced**: `seed=3, data.seed=3` lacks 1 of the configs" in text
    assert "Every interval below is over these 3 blocks (n = 3, 2 degrees of freedom)" in text
    crossed = _study(params__seed=["1", "1", "2", "2"], params__data__seed=["1", "2", "1", "2"])
    blocks = rd.block_ids(crossed, rd.unit_ids(crossed))
    text = "\n".join(report_text.design_found_lines([], 1, blocks, rd.replicate_design(crossed)))
    assert "**1 independent block**: the 4 combinations of `seed`, `data.seed` share values" in text
    assert "**One block: no interval anywhere.**" in text
    # how wide with 3 blocks, and what 5 would give: t(2) = 4.303 and t(4) = 2.776 at sd 2 points
    lines = "\n".join(report_text.precision_lines(3, {"total": 0.02, "split": 0.04}))
    assert f"that is ±{100 * T_975[2] * 0.02 / math.sqrt(3):.1f} points" in lines  # ±5.0
    assert f"it would be ±{100 * T_975[4] * 0.02 / math.sqrt(5):.1f} with 5" in lines  # ±2.5
    assert "The most variable component, `split` (sd 4.0 points)" in lines
    assert report_text.precision_lines(1, {"total": 0.02}) == []

"""The gap measurement against computations that share none of its code (issue 11, item 1; issue 33).

``tests/independent.py``'s ``IndependentCheck`` rides along both phases of a real run, on the whole-model
path and on frozen inputs, with trainable BatchNorm (unfrozen from layer 100), augmentation and dropout on
and a real learning rate, and rebuilds every measured condition by hand, drawing the augmentations and
masks in its own way (see its docstring). The BN momentum is lowered to 0.9 from the start of each phase
(as a larger data set, or EfficientNet's 0.99, would do): statistics that drift during the measuring loop
then show clearly, at four batches an epoch.

With the weights held still, ``gap/lag`` must be exactly 0 on every path: the measuring pass replays what
training computed, and Keras's own epoch-averaged ``loss`` and ``accuracy`` are the independent numbers."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from .helpers import history, make_cfg, read_split
from .independent import IndependentCheck, train_with

SEED = 42
BATCH = 8
MOMENTUM = 0.9
PATHS = {"whole model": "cache.features=false", "frozen inputs": "cache.features=true"}
# every random part on, BatchNorm trainable from layer 100 in phase 2 (the frozen bottom is cut there)
EVERYTHING_ON = ("augment=standard", "model.dropout=0.2", "model.freeze_bn=false", "model.fine_tune_at=100")


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_measured_conditions_equal_independent_passes_in_both_phases(image_dir, tracking_uri, monkeypatch, path):
    """Every condition of every epoch of both phases, on both paths, equals the independent check's. The
    frozen-inputs run attributes by Shapley values (diagnostics.attribution=shapley): its batchnorm, dropout
    and augmentation components also equal the check's, from all eight corners averaged over six orders."""
    shapley = path == "frozen inputs"
    attribution = f"diagnostics.attribution={'shapley' if shapley else 'ordered'}"
    cfg = make_cfg(image_dir, tracking_uri, *EVERYTHING_ON, "diagnostics=full", attribution, PATHS[path])
    assert cfg.data.batch_size == BATCH and cfg.data.seed == SEED
    train, val = read_split(image_dir, cfg.data.image_size)
    check = IndependentCheck(train, val, None, SEED, BATCH, MOMENTUM, shapley=shapley)
    run = train_with(monkeypatch, cfg, check)
    assert check.checked == [(1, 0), (1, 1), (2, 2), (2, 3)]
    on = "off" if path == "whole model" else "on: "
    assert all(run.data.tags[f"feature_cache.phase{p}"].startswith(on) for p in (1, 2)), run.data.tags


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_lag_is_exactly_zero_with_the_weights_held_still(image_dir, tracking_uri, monkeypatch, path):
    """A learning rate of 1e-46 is 0 in float32: no weight moves in either phase. The epoch's batches,
    augmentations and dropout masks then give the end-of-epoch model what they gave it during the epoch,
    and the measured training-mode numbers equal Keras's own epoch averages bit for bit, in accuracy and
    in loss, with BatchNorm on batch statistics in phase 2. (Before the measuring pass replayed training's
    draws, the lag of such a run was -6.3 to +9.4 points.)"""
    still = ("train.base_lr=1e-46", "train.fine_tune_lr=1e-46", "diagnostics=full")
    cfg = make_cfg(image_dir, tracking_uri, *EVERYTHING_ON, *still, PATHS[path])
    run = train_with(monkeypatch, cfg)
    uri, run_id = tracking_uri, run.info.run_id
    assert [v for _, v in history(uri, run_id, "learning_rate")] == [0.0] * 4  # float32(1e-46)
    for key in ("gap/lag", "gap_loss/lag"):
        assert [v for _, v in history(uri, run_id, key)] == [0.0] * 4, history(uri, run_id, key)
    assert history(uri, run_id, "train_mode_loss") == history(uri, run_id, "loss")
    # the effects the lag must not contain were there: dropout and BatchNorm move the training-mode numbers
    assert all(v != 0 for _, v in history(uri, run_id, "gap_loss/dropout"))
    assert all(v != 0 for _, v in history(uri, run_id, "gap_loss/batchnorm")[2:])


def test_own_seed_streams_never_overlap():
    """Without a replay each random layer draws from a stream of its own: Keras advances a seed state's
    second element once per draw, so streams that start at ``(k + i, 0)`` never meet, where the former
    rule ``(k, i)`` made layer i's draw for batch b + 1 the one layer i + 1 made for batch b."""
    from finetune_ablation.gap.meter import own_seed_states

    def streams(states, draws: int) -> list[list[tuple[int, int]]]:
        out = []
        for state in states:
            generator = keras.random.SeedGenerator(0)
            generator.state.assign(state)
            out.append([tuple(int(v) for v in generator.next().numpy()) for _ in range(draws)])
        return out

    own = streams(own_seed_states(42, 3, 3), 50)
    assert not set(own[0]) & set(own[1]) and not set(own[1]) & set(own[2]) and not set(own[0]) & set(own[2])
    former = streams([np.array([42 * 1_000_003 + 3, i]) for i in range(3)], 50)
    assert former[0][1] == former[1][0]  # the overlap the streams avoid
    assert own_seed_states(42, 3, 3)[0].tolist() != own_seed_states(42, 4, 3)[0].tolist()  # a new draw per epoch


@pytest.mark.slow
def test_measuring_passes_are_traced_once_per_run_and_the_cut_is_exact(image_dir, tracking_uri):
    """Two phases' meters share their traced passes: each pass is traced once, whatever the phase,
    except the training-mode pass, which depends on which BatchNorm layers are trainable. In phase 2
    the base is cut below its first trainable layer; at MobileNetV2's layer 100 two tensors cross the
    cut (the residual add's other input), and bottom-then-top computes exactly Keras's own call of the whole base."""
    from finetune_ablation.gap.meter import GapMeter
    from finetune_ablation.gap.passes import MeasuringPasses
    from finetune_ablation.gap.scoring import Scorer
    from finetune_ablation.run.augment import build_augmentation
    from finetune_ablation.run.data import load_datasets
    from finetune_ablation.run.model import build_classifier, freeze_base, load_base, unfreeze_top

    cfg = make_cfg(image_dir, tracking_uri, "model.freeze_bn=false", "augment=standard")
    data = load_datasets(cfg.data)
    base = load_base(cfg.model, cfg.data.image_size)
    clf = build_classifier(cfg.model, base, build_augmentation(cfg.augment, SEED), 2, cfg.data.image_size)
    scorer = Scorer(
        "accuracy",
        lambda y, logits: keras.metrics.binary_accuracy(y, logits, threshold=0.0),
        keras.losses.BinaryCrossentropy(from_logits=True),
    )
    freeze_base(base)
    phase1 = GapMeter(clf.model, data.train_in_order, SEED)
    for epoch in (0, 1):
        phase1.measure(epoch, scorer)
    unfreeze_top(base, 100, freeze_bn=False)
    phase2 = GapMeter(clf.model, data.train_in_order, SEED)
    for epoch in (2, 3):
        phase2.measure(epoch, scorer)

    passes = MeasuringPasses.of(clf.model)
    assert phase1.passes is passes and phase2.passes is passes
    split = passes.split()
    traced = {
        "augment": passes.augment,
        "features_infer": passes.features_infer,  # phase 1's training mode too: no trainable BN there
        "head_dropout": passes.head_dropout,
        "head_infer": passes.head_infer,
        "bottom": split.bottom,
        "top_train": split.train(phase2.bns),
        "top_no_bn": split.top_no_bn,
        "top_infer": split.top_infer,
    }
    assert {name: f.experimental_get_tracing_count() for name, f in traced.items()} == dict.fromkeys(traced, 1)
    assert passes.features_no_bn.experimental_get_tracing_count() == 0  # phase 2 ran the split instead

    # layer 100 (a ReLU) has no weights: the cut is at the first layer with trainable weights after it
    assert base.layers[split.cut].name == "block_11_depthwise" and not base.layers[100].weights
    names = sorted(t._keras_history.operation.name for t in split.frozen.bottom.outputs)
    assert names == ["block_10_project_BN", "block_11_expand_relu"]
    x = clf.preprocess(next(iter(data.train_in_order))[0])
    np.testing.assert_array_equal(split.frozen.top(split.frozen.bottom(x)), base(x, training=False))


def test_removal_orders_and_shapley_values_on_a_known_interaction():
    """Corners of a known response: main effects b, d, a and one interaction i between BatchNorm and
    augmentation (present only while both are on). Each order puts i in the one of the two it removes
    first (the other is then removed from a model without the interaction): the chain's BatchNorm. The
    Shapley value gives each half; every attribution sums to the same all-off minus all-on."""
    from finetune_ablation.gap.decomposition import EFFECTS, ordered_components, shapley_components

    b, d, a, i = 0.03, -0.02, 0.05, 0.04

    def value(removed: frozenset) -> float:  # the training-mode number with ``removed`` effects off
        on = set(EFFECTS) - removed
        return (
            0.5
            - b * ("batchnorm" in on)
            - d * ("dropout" in on)
            - a * ("augmentation" in on)
            - i * ({"batchnorm", "augmentation"} <= on)
        )

    corners = {frozenset(s): value(frozenset(s)) for n in range(4) for s in itertools.combinations(EFFECTS, n)}
    chain = ordered_components(corners)
    assert chain == pytest.approx({"batchnorm": b + i, "dropout": d, "augmentation": a}, abs=1e-15)
    reverse = ordered_components(corners, ("augmentation", "dropout", "batchnorm"))
    assert reverse == pytest.approx({"batchnorm": b, "dropout": d, "augmentation": a + i}, abs=1e-15)
    shapley = shapley_components(corners)
    assert shapley == pytest.approx({"batchnorm": b + i / 2, "dropout": d, "augmentation": a + i / 2}, abs=1e-15)
    everything = corners[frozenset(EFFECTS)] - corners[frozenset()]
    assert sum(shapley.values()) == pytest.approx(everything, abs=1e-15) == sum(chain.values())

"""The phase-1 cache: a hit trains no phase 1, yet every logged metric is bit-identical to an uncached run.

Two jobs that need one entry at once (the entry's file lock: one computes it, the other waits and loads
it) are tests/test_optuna_sweeper.py's search: two joblib workers, four trials, one miss and three hits."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import mlflow
import pytest
from mlflow.entities import Run

from finetune_ablation.cli import run_job

from .helpers import history, make_cfg, new_store, runs

KERAS_AND_GAP = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "gap/total", "gap/batchnorm")


def _run(image_dir, uri, cache_dir, *overrides):
    cached = ["cache.phase1=true", f"cache.dir={cache_dir}"] if cache_dir else []
    assert run_job(make_cfg(image_dir, uri, *cached, *overrides)) is not None
    return runs(uri)[-1]


def _phase1_lines(run_and_print: Callable[[], Run]) -> tuple[Run, list[str]]:
    """Run, and keep the lines it printed for phase 1 (what a user sees of it)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run = run_and_print()
    return run, [line for line in printed.getvalue().splitlines() if line.startswith("phase 1 ")]


@pytest.fixture(scope="module")
def cached_study(image_dir, tmp_path_factory) -> dict:
    """One store and one cache, as a user's study fills them: the course's run with the cache off, the
    same run that fills the cache (miss), the same again (hit), and what each printed for phase 1. The
    tests of what an entry is shared by add their runs to this store and cache."""
    folder = tmp_path_factory.mktemp("cached-study")
    uri, cache = new_store(folder), folder / "cache"
    plain = _run(image_dir, uri, None)
    miss, miss_lines = _phase1_lines(lambda: _run(image_dir, uri, cache))
    hit, hit_lines = _phase1_lines(lambda: _run(image_dir, uri, cache))
    return {"uri": uri, "cache": cache, "plain": plain, "miss": (miss, miss_lines), "hit": (hit, hit_lines)}


@pytest.mark.slow
def test_cached_phase1_gives_bit_identical_runs(cached_study):
    uri, plain = cached_study["uri"], cached_study["plain"]
    (miss, trained_lines), (hit, cached_lines) = cached_study["miss"], cached_study["hit"]
    # a user who runs the same command again still sees phase 1, said to come from the cache
    assert len(trained_lines) == 2
    assert cached_lines == [f"{line}  (from the phase-1 cache)" for line in trained_lines]
    assert plain.data.tags["phase1_cache"] == "off"
    assert miss.data.tags["phase1_cache"] == "miss" and hit.data.tags["phase1_cache"] == "hit"
    for run in (miss, hit):
        assert run.data.tags["model.weights_sha256"] == plain.data.tags["model.weights_sha256"]
        for key in plain.data.metrics:
            assert history(uri, run.info.run_id, key) == history(uri, plain.info.run_id, key), key
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(hit.info.run_id)}
    assert "trainable_weights_phase1.txt" in artifacts


@pytest.mark.slow
def test_phase2_settings_share_the_entry_and_phase1_settings_do_not(image_dir, cached_study):
    uri, cache, (first, _) = cached_study["uri"], cached_study["cache"], cached_study["miss"]
    deeper = _run(image_dir, uri, cache, "model.fine_tune_at=140", "model.freeze_bn=true", "train.fine_tune_lr=3e-5")
    assert first.data.params["model.fine_tune_at"] == "150"  # FAST's depth: 140 unfreezes more
    assert deeper.data.tags["phase1_cache"] == "hit"
    assert deeper.data.tags["phase1_cache_key"] == first.data.tags["phase1_cache_key"]
    for key in KERAS_AND_GAP:
        assert history(uri, deeper.info.run_id, key)[:2] == history(uri, first.info.run_id, key)[:2]
    other = _run(image_dir, uri, cache, "model.dropout=0.5")
    assert other.data.tags["phase1_cache"] == "miss"
    assert other.data.tags["phase1_cache_key"] != first.data.tags["phase1_cache_key"]


# Relative float32 precision of a loss after a forward pass through the base and a few epochs of
# training from features computed in a different graph: float32 rounds at 6e-8, the runs differ by ~1e-6
# relative here; 1e-4 leaves room for other CPUs' kernels. Taken of the TERMS' size, never of a difference.
RELATIVE = 1e-4
# ROUNDING_GROWS: training amplifies a rounding difference. Adam divides each gradient by its running
# size, so a gradient that differs in its last bits still moves a weight by up to the learning rate, and
# BatchNorm on batch statistics of 8 images at 2x2 pixels divides by tiny variances. Measured with the
# frozen bottom computed once in phase 2, unfrozen from layer 100: after one phase-2 epoch the largest
# difference is 6e-6 relative (16x inside RELATIVE); after a second epoch it is 6e-4. From FAST's layer 150
# (fewer layers train): 5.6e-7 after one epoch and after two, and with augmentation 7e-6 after two epochs
# at 1e-4. So the comparison without augmentation runs one phase-2 epoch (it goes through every path:
# training steps, validation, all four measured conditions), the augmented one two, at FAST's depth.
# gap_loss component -> the two logged losses it is the difference of
LOSS_TERMS = {
    "total": ("val_loss", "loss"),
    "lag": ("train_mode_loss", "loss"),
    "batchnorm": ("no_batchnorm_loss", "train_mode_loss"),
    "dropout": ("no_dropout_loss", "no_batchnorm_loss"),
    "augmentation": ("train_clean_loss", "no_dropout_loss"),
    "split": ("val_loss", "train_clean_loss"),
}


def _tolerance(key: str, step: int, run: dict[str, dict[int, float]], counts: dict[str, int]) -> float:
    """How far two runs that differ only by float rounding may put metric ``key`` apart at ``step``."""
    if key.startswith("gap_loss/"):  # a difference keeps the absolute error of both of its terms
        return RELATIVE * sum(abs(run[t][step]) for t in LOSS_TERMS[key.split("/")[1]])
    if key.endswith("loss") or key.endswith("bn_moving_stats_delta"):
        return RELATIVE * abs(run[key][step])
    if key.endswith("_correct"):  # an image whose logit sits within rounding of 0 may flip
        return 1
    if key.startswith("gap/"):  # an image may flip in each of the two accuracies
        terms = LOSS_TERMS[key.split("/")[1]]
        return sum(1 / counts["val" if t.startswith("val") else "train"] for t in terms)
    if "accuracy" in key:  # one image of its split (an interval bound moves about as much)
        return 1 / counts["val" if key.startswith("val") else "train"]
    return 0.0  # counts, learning rates, parameter counts, the majority rate: exact


def _same_within_float_tolerance(uri: str, a, b, skip: tuple[str, ...] = ()) -> None:
    """Every metric of run ``a`` equals run ``b``'s at every step within ``_tolerance`` (but those with a
    name containing one of ``skip``)."""
    assert set(a.data.metrics) == set(b.data.metrics)
    counts = {k: int(a.data.params[f"data.count.{k}.total"]) for k in ("train", "val")}
    left = {key: dict(history(uri, a.info.run_id, key)) for key in a.data.metrics}
    right = {key: dict(history(uri, b.info.run_id, key)) for key in b.data.metrics}
    for key in left:
        if any(part in key for part in skip):
            continue
        assert sorted(left[key]) == sorted(right[key]), key
        for step, value in left[key].items():
            tolerance = _tolerance(key, step, left, counts)
            assert abs(value - right[key][step]) <= tolerance, (key, step, value, right[key][step], tolerance)


@pytest.mark.slow
def test_frozen_inputs_equal_running_the_frozen_layers_every_epoch(image_dir, tracking_uri):
    """augment=none: phase 1 trains the head on pooled features computed once, phase 2 trains the unfrozen
    top on the frozen bottom's activations computed once; every metric of both phases, the gap measurement
    included, equals the run that passes every image through the whole base every epoch, to float
    tolerance. And measuring still changes nothing on this path: diagnostics off gives the same run."""
    one_epoch = ("augment=none", "train.fine_tune_epochs=1")  # see ROUNDING_GROWS
    cached = _run(image_dir, tracking_uri, None, *one_epoch, "cache.features=true")
    uncached = _run(image_dir, tracking_uri, None, *one_epoch, "cache.features=false")
    tags = cached.data.tags
    assert tags["feature_cache.phase1"].startswith("on: the whole base is frozen"), tags["feature_cache.phase1"]
    assert tags["feature_cache.phase2"].startswith("on: layers 0-"), tags["feature_cache.phase2"]
    assert uncached.data.tags["feature_cache.phase1"] == uncached.data.tags["feature_cache.phase2"] == "off"
    _same_within_float_tolerance(tracking_uri, cached, uncached)
    assert "timing.phase1_seconds" in tags and "timing.phase2_seconds" in tags

    unmeasured = _run(image_dir, tracking_uri, None, *one_epoch, "cache.features=true", "diagnostics=off")
    assert unmeasured.data.tags["model.weights_sha256"] == tags["model.weights_sha256"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history(tracking_uri, unmeasured.info.run_id, key) == history(tracking_uri, cached.info.run_id, key)


@pytest.mark.slow
def test_augmented_frozen_inputs_train_as_the_whole_model_does(image_dir, tracking_uri):
    """augment=standard: each epoch's augmented batches go through the frozen part in the pipeline (the
    pooled base in phase 1, the bottom in phase 2) and the top trains on them; the model's own random
    layers draw the same augmentations as in the whole model's call, and both paths' measurements replay
    the epoch's own batches and draws, so every metric equals the run that passes every image through the
    whole base, over two epochs of each phase at the default learning rates (see ROUNDING_GROWS:
    measured, 7e-6 relative in the losses of the last epoch)."""
    cached = _run(image_dir, tracking_uri, None, "augment=standard", "cache.features=true")
    uncached = _run(image_dir, tracking_uri, None, "augment=standard", "cache.features=false")
    tags = cached.data.tags
    assert tags["feature_cache.phase1"].startswith("on: the whole base is frozen: its pooled features are computed")
    assert "every epoch" in tags["feature_cache.phase1"]
    assert tags["feature_cache.phase2"].startswith("on: layers 0-") and "every epoch" in tags["feature_cache.phase2"]
    assert cached.data.params["train.fine_tune_lr"] == "0.0001" and cached.data.params["train.fine_tune_epochs"] == "2"
    _same_within_float_tolerance(tracking_uri, cached, uncached)


def test_the_plan_computes_once_exactly_what_is_frozen_and_deterministic():
    """Which frozen inputs a phase may compute once, checked against the layers themselves: the whole
    base's pooled features only when nothing in it trains or draws random numbers (EfficientNet's
    stochastic depth does, even frozen), else the layers below the first one that does; nothing with
    nothing frozen at the bottom. Past the memory budget (which, with augmentation and measuring, holds one
    epoch's inputs more: they are computed every epoch) they go to a scratch file on disk."""
    from dataclasses import replace

    import keras

    from finetune_ablation.config import AugmentConfig, CacheConfig, ModelConfig
    from finetune_ablation.gap.layers import has_random_layers
    from finetune_ablation.gap.passes import MeasuringPasses
    from finetune_ablation.run import feature_cache
    from finetune_ablation.run.augment import build_augmentation
    from finetune_ablation.run.kept_rows import Storage
    from finetune_ablation.run.model import build_classifier, freeze_base, load_base, unfreeze_top

    def classifier(name: str, architecture: str, augment: AugmentConfig):
        cfg = ModelConfig(name=name, architecture=architecture, alpha=None, weights=None)
        base = load_base(cfg, 32)
        return build_classifier(cfg, base, build_augmentation(augment, 0), 2, 32)

    def first_varying(base) -> int:  # by hand: weights that train, a trainable BN, or a random layer
        for i, layer in enumerate(base.layers):
            if layer.trainable_weights or isinstance(layer, keras.layers.Dropout) or has_random_layers(layer):
                return i
        raise AssertionError("nothing varies")

    no_augment = AugmentConfig(flip=None, rotation=0.0)
    mobilenet = classifier("mobilenet_v2", "MobileNetV2", no_augment)
    freeze_base(mobilenet.base)
    assert feature_cache.plan(mobilenet, 32, 8).stage == "pooled"
    unfreeze_top(mobilenet.base, 100, freeze_bn=False)
    bottom = feature_cache.plan(mobilenet, 32, 8)
    assert (bottom.stage, bottom.cut) == ("bottom", first_varying(mobilenet.base))
    assert bottom.cut >= 100 and mobilenet.base.layers[bottom.cut].trainable_weights
    over = feature_cache.plan(mobilenet, 32, 8, Storage.from_config(CacheConfig(frozen_inputs_memory_mib=0)))
    assert (over.stage, over.placement.where) == ("bottom", "disk"), over
    assert bottom.placement.where == "memory"
    unfreeze_top(mobilenet.base, 0, freeze_bn=False)
    assert feature_cache.plan(mobilenet, 32, 8).reason.startswith("no layer with weights")

    efficientnet = classifier("efficientnet", "EfficientNetB0", no_augment)
    freeze_base(efficientnet.base)
    cut = feature_cache.plan(efficientnet, 32, 8)
    assert (cut.stage, cut.cut) == ("bottom", first_varying(efficientnet.base))
    assert isinstance(efficientnet.base.layers[cut.cut], keras.layers.Dropout)  # stochastic depth

    # with augmentation the same parts, computed every epoch: one epoch's more to keep in the budget
    augmented = classifier("mobilenet_v2", "MobileNetV2", AugmentConfig())
    freeze_base(augmented.base)
    pooled = feature_cache.plan(augmented, 32, 8)
    assert (pooled.stage, pooled.every_epoch) == ("pooled", True) and "every epoch" in pooled.reason
    unfreeze_top(augmented.base, 100, freeze_bn=False)
    every_epoch = feature_cache.plan(augmented, 32, 8)
    assert (every_epoch.stage, every_epoch.cut, every_epoch.every_epoch) == ("bottom", bottom.cut, True)
    per_image = MeasuringPasses.of(augmented.model).frozen_bottom(bottom.cut).bytes_per_image
    both_splits = replace(Storage.from_config(), frozen_inputs_memory_bytes=per_image * (32 + 8))
    assert feature_cache.plan(augmented, 32, 8, both_splits).placement.where == "disk"
    assert feature_cache.plan(augmented, 32, 8, both_splits, measuring=False).placement.where == "memory"
    unfreeze_top(mobilenet.base, 100, freeze_bn=False)
    assert feature_cache.plan(mobilenet, 32, 8, both_splits).placement.where == "memory"  # no augmentation: fits

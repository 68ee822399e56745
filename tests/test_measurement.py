"""The gap measurement against computations that share none of its code (issue 11, item 1).

A Keras callback rides along phase 2 of a real run (trainable BatchNorm, augmentation and dropout on).
It snapshots every model variable in ``on_test_begin``, i.e. after the epoch's last training step and
before any ``on_epoch_end`` callback (the meter included) runs. In ``on_epoch_end``, after the meter, it
puts the snapshot back and rebuilds each condition by hand: the images are read with Keras's own loader
(``image_dataset_from_directory`` fixes the split; ``load_img`` reads each file), every pass is a plain
call of the model's layers, and the losses are computed in float64 NumPy. What it shares with the meter is
the documented seeding rule of the measuring draws on the whole-model path (seed state ``i`` of the
augmentation and head-dropout layers starts at ``(seed * 1_000_003 + epoch, i)`` every epoch), so that the
augmented batches and dropout masks are the same ones.

The BN momentum is lowered to 0.9 at the start of phase 2 (as a larger data set, or EfficientNet's 0.99,
would do): statistics that drift during the measuring loop then show clearly, at four batches an epoch."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from finetune_ablation.run.train import train_and_log

from .helpers import make_cfg

SEED = 42
SPLIT_SEED = 42
BATCH = 8
MOMENTUM = 0.9
# Relative precision of a float32 forward pass through the base, as a fraction of the size of the terms
# summed into a logit: float32 rounds at 6e-8; ~100 layers of sums and differently ordered kernels on
# another CPU stay well below 1e-5; 1e-4 leaves a margin of ten.
RELATIVE = 1e-4


def read_split(image_dir: Path, size: int, seed: int = SPLIT_SEED, validation_split: float = 0.2):
    """Both splits as Keras splits the folder, read file by file: (images, labels) in the file order."""
    train, val = keras.utils.image_dataset_from_directory(
        str(image_dir),
        validation_split=validation_split,
        subset="both",
        seed=seed,
        batch_size=None,
        image_size=(size, size),
        verbose=False,
    )
    classes = sorted(p.name for p in image_dir.iterdir() if p.is_dir())

    def read(paths):
        images = [keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size))) for p in paths]
        labels = np.array([classes.index(Path(p).parent.name) for p in paths])
        return np.stack(images).astype(np.float32), labels

    return read(train.file_paths), read(val.file_paths)


class Pass:
    """Logits of one condition over a split, computed in float64 from the pooled features and the
    logits layer's weights, with the size of the terms each logit sums (its float32 error scale)."""

    def __init__(self):
        self.logits, self.scale, self.labels = [], [], []

    def add(self, features, head: keras.layers.Dense, labels) -> None:
        kernel, bias = (np.asarray(w, dtype=np.float64) for w in head.get_weights())
        f = np.asarray(features, dtype=np.float64)
        self.logits.append(f @ kernel + bias)
        self.scale.append((np.abs(f) @ np.abs(kernel) + np.abs(bias)).max(axis=1))
        self.labels.append(np.asarray(labels))

    def result(self, threshold: float = 0.0) -> tuple[float, float, float, int, int]:
        """Accuracy (one logit: class 1 above ``threshold``), mean loss, the loss's error bound, the number
        of images whose predicted class a rounding error could flip, and the number of images."""
        z, s, y = (np.concatenate(v) for v in (self.logits, self.scale, self.labels))
        tolerance = RELATIVE * s  # per-image error bound of every logit
        if z.shape[1] == 1:  # one logit: sigmoid; |d loss / d logit| <= 1
            z = z[:, 0]
            losses = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
            correct, margin, slope = (z > threshold) == (y > 0.5), np.abs(z - threshold), 1.0
        else:  # softmax; the loss moves at most 2x the largest logit error, a margin 2x as well
            top = np.max(z, axis=1, keepdims=True)
            losses = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0] - z[np.arange(len(y)), y.astype(int)]
            ordered = np.sort(z, axis=1)
            correct, margin, slope = np.argmax(z, axis=1) == y, (ordered[:, -1] - ordered[:, -2]) / 2, 2.0
        borderline = int(np.sum(margin <= tolerance))
        return float(correct.mean()), float(losses.mean()), slope * float(tolerance.mean()), borderline, len(y)

    def compare(self, measured_accuracy: float, measured_loss: float, name: str, threshold: float = 0.0) -> None:
        accuracy, loss, loss_tolerance, borderline, count = self.result(threshold)
        assert abs(measured_loss - loss) <= loss_tolerance, (name, measured_loss, loss, loss_tolerance)
        assert abs(round(measured_accuracy * count) - round(accuracy * count)) <= borderline, (
            name,
            measured_accuracy,
            accuracy,
        )


def independent_passes(model: keras.Model, train, val, batch: int = 8) -> tuple[Pass, Pass]:
    """train_clean and val of ``model`` (inference mode), batch by batch over the splits."""
    pre, pool, head = (model.get_layer(n) for n in ("preprocess", "pool", "logits"))
    aug = model.get_layer("augmentation")
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer is not aug)
    out = []
    for images, labels in (train, val):
        p = Pass()
        for start in range(0, len(labels), batch):
            x = images[start : start + batch]
            p.add(pool(base(pre(x), training=False)), head, labels[start : start + batch])
        out.append(p)
    return out[0], out[1]


class IndependentCheck(keras.callbacks.Callback):
    """Recomputes the measured conditions at every phase-2 epoch end (see the module docstring)."""

    def __init__(self, train, val):
        super().__init__()
        self.train, self.val = train, val
        self.checked: list[int] = []

    def _bns(self):
        return [layer for layer in self.model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]

    def on_train_begin(self, logs=None):
        for bn in self._bns():
            bn.momentum = MOMENTUM

    def on_test_begin(self, logs=None):
        self.snapshot = [np.array(v.numpy(), copy=True) for v in self.model.variables]

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        after_meter = [np.array(v.numpy(), copy=True) for v in model.variables]
        for v, value in zip(model.variables, self.snapshot, strict=True):
            v.assign(value)
        aug, pre, pool, drop, head = (
            model.get_layer(n) for n in ("augmentation", "preprocess", "pool", "dropout", "logits")
        )
        base = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer is not aug)
        seeds = [v for layer in (aug, drop) for v in layer.variables if "seed" in v.path]
        for i, state in enumerate(seeds):
            state.assign(np.array([SEED * 1_000_003 + epoch, i], dtype=state.dtype))
        drop_seeds = [v for v in drop.variables if "seed" in v.path]
        bn_stats = [v for bn in self._bns() for v in (bn.moving_mean, bn.moving_variance)]
        passes = {name: Pass() for name in ("train_mode", "no_batchnorm", "no_dropout", "train_clean", "val")}
        images, labels = self.train
        for start in range(0, len(labels), BATCH):
            x, y = images[start : start + BATCH], labels[start : start + BATCH]
            augmented = aug(x, training=True)
            # training mode: batch statistics (Keras assigns the moving ones: put them back at once)
            stats = [np.array(v.numpy(), copy=True) for v in bn_stats]
            f_train = pool(base(pre(augmented), training=True))
            for v, value in zip(bn_stats, stats, strict=True):
                v.assign(value)
            f_moving = pool(base(pre(augmented), training=False))  # MobileNetV2 has no random layers
            mask_state = [np.array(v.numpy(), copy=True) for v in drop_seeds]
            passes["train_mode"].add(drop(f_train, training=True), head, y)
            for v, value in zip(drop_seeds, mask_state, strict=True):
                v.assign(value)
            passes["no_batchnorm"].add(drop(f_moving, training=True), head, y)
            passes["no_dropout"].add(f_moving, head, y)
            passes["train_clean"].add(pool(base(pre(x), training=False)), head, y)
        passes["val"] = independent_passes(model, self.val, self.val, BATCH)[1]
        for name in ("train_mode", "no_batchnorm", "no_dropout", "train_clean"):
            passes[name].compare(logs[f"{name}_accuracy"], logs[f"{name}_loss"], name)
        passes["val"].compare(logs["val_accuracy"], logs["val_loss"], "val")
        # measuring changed nothing the next epoch reads: the meter left the end-of-epoch values
        for before, after in zip(self.snapshot, after_meter, strict=True):
            np.testing.assert_array_equal(before, after)
        for v, value in zip(model.variables, after_meter, strict=True):
            v.assign(value)
        self.checked.append(epoch)


@pytest.mark.slow
def test_measured_conditions_equal_independent_passes_with_trainable_batchnorm(image_dir, tracking_uri):
    """The whole-model path (``cache.features=false``), where the meter draws its own augmentations. With
    frozen inputs it measures the epoch's own batches instead: tests/test_cache.py checks those against
    Keras's own training loss."""
    overrides = ("model.freeze_bn=false", "augment=standard", "diagnostics=full", "cache.features=false")
    cfg = make_cfg(image_dir, tracking_uri, *overrides, "model.fine_tune_at=100")  # 18 BatchNorm layers train
    assert cfg.data.batch_size == BATCH and cfg.seed == SEED
    check = IndependentCheck(*read_split(image_dir, cfg.data.image_size))
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run():
        train_and_log(cfg, extra_callbacks=[check])
    assert check.checked == [2, 3]  # both phase-2 epochs, BN trainable in both


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
        keras.losses.BinaryCrossentropy(from_logits=True).call,
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

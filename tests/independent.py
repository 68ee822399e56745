"""The gap measurement recomputed without the meter's code: the tests' independent check.

``IndependentCheck`` is a Keras callback that rides along a real run, both phases, on either path (the
whole model, or frozen inputs where ``fit`` trains only the layers above them). It snapshots every
variable of the classifier in ``on_test_begin``, i.e. after the epoch's last training step and before any
``on_epoch_end`` callback (the meter included) runs. In ``on_epoch_end``, after the meter, it rebuilds each
condition by hand: the images read with Keras's own loader (``image_dataset_from_directory`` fixes the
split; ``load_img`` reads each file), every pass a plain call of the model's layers, the losses computed in
float64 NumPy.

It draws as training drew, in a way of its own. The batches: the data pipeline's documented shuffle rule
(positions in the split, ``shuffle`` over all of them with seed ``data.seed + 1_000_003 * phase``,
reshuffled every epoch; docs/gap-measurement.md), taken epoch by epoch from the phase's start. The
augmentations and dropout masks: copies of the model's augmentation and dropout layers (made from their
configs: they share no variable with the model), whose seed states are set once, to the model's when the
phase begins, and then advance by the check's own calls, one per batch, as training's calls advanced the
model's. Nothing here reads the states the meter captures or uses its seeding. The check never writes a
seed state of the model (with frozen inputs, the data pipeline draws from them while the check runs).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import mlflow
import numpy as np
import tensorflow as tf

from finetune_ablation.run import train as train_module

# Relative precision of a float32 forward pass through the base, as a fraction of the size of the terms
# summed into a logit: float32 rounds at 6e-8; ~100 layers of sums and differently ordered kernels on
# another CPU stay well below 1e-5; 1e-4 leaves a margin of ten.
RELATIVE = 1e-4
CONDITIONS = ("train_mode", "no_batchnorm", "no_dropout", "train_clean")
EFFECTS = ("batchnorm", "dropout", "augmentation")
# the corners besides the chain of CONDITIONS, by the effects removed
CORNERS = ("dropout", "augmentation", "batchnorm+augmentation", "dropout+augmentation")
CORNER_OF = {
    frozenset(): "train_mode",
    frozenset({"batchnorm"}): "no_batchnorm",
    frozenset({"batchnorm", "dropout"}): "no_dropout",
    frozenset(EFFECTS): "train_clean",
    **{frozenset(name.split("+")): name for name in CORNERS},
}


def _compare_shapley(passes: dict, logs: dict) -> None:
    """The logged components against Shapley values computed here: each effect's change on removal,
    averaged over the six orders of removing the three, written out order by order."""
    results = {removed: passes[name].result() for removed, name in CORNER_OF.items()}
    count = results[frozenset()][4]
    orders = [
        ("batchnorm", "dropout", "augmentation"),
        ("batchnorm", "augmentation", "dropout"),
        ("dropout", "batchnorm", "augmentation"),
        ("dropout", "augmentation", "batchnorm"),
        ("augmentation", "batchnorm", "dropout"),
        ("augmentation", "dropout", "batchnorm"),
    ]
    for index, prefix in ((0, "gap/"), (1, "gap_loss/")):
        for effect in EFFECTS:
            total, bound = 0.0, 0.0
            for order in orders:
                before = frozenset(order[: order.index(effect)])
                after, prior = results[before | {effect}], results[before]
                total += after[index] - prior[index]
                if index == 0:  # images a rounding could flip, in both terms
                    bound += (after[3] + prior[3]) / count
                else:  # a difference keeps both terms' errors
                    bound += after[2] + prior[2]
            assert abs(logs[prefix + effect] - total / 6) <= bound / 6 + 1e-12, (prefix + effect, logs, total / 6)


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


def _blocks(model: keras.Model):
    """The classifier's augmentation, preprocessing, base, pooling, dropout and logits layers."""
    names = ("augmentation", "preprocess", "pool", "dropout", "logits")
    aug, pre, pool, drop, head = (model.get_layer(n) for n in names)
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer is not aug)
    return aug, pre, base, pool, drop, head


def independent_passes(model: keras.Model, train, val, batch: int = 8) -> tuple[Pass, Pass]:
    """train_clean and val of ``model`` (inference mode), batch by batch over the splits."""
    _, pre, base, pool, _, head = _blocks(model)
    out = []
    for images, labels in (train, val):
        p = Pass()
        for start in range(0, len(labels), batch):
            x = images[start : start + batch]
            p.add(pool(base(pre(x), training=False)), head, labels[start : start + batch])
        out.append(p)
    return out[0], out[1]


def _seeds(layer: keras.layers.Layer) -> list:
    return [v for v in layer.variables if "seed" in v.path]


def _copy(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The same layer made anew from its config: the same draws from the same seed state, no shared variable."""
    return type(layer).from_config(layer.get_config())


class IndependentCheck(keras.callbacks.Callback):
    """Recomputes the measured conditions at every epoch's end of both phases (see the module docstring).

    ``classifier()`` returns the whole classifier (with frozen inputs ``fit`` trains a model made of its
    upper layers, which this callback is attached to). ``momentum``: every BatchNorm's momentum from the
    start of each phase (lowered, statistics that drift during a measuring loop show at four batches).
    ``shapley``: the run attributes by Shapley values; the check then also builds the other four of the
    2x2x2 corners and averages the components over the six removal orders by hand."""

    def __init__(
        self,
        train,
        val,
        classifier: Callable[[], keras.Model],
        data_seed: int,
        batch: int,
        momentum=None,
        shapley: bool = False,
    ):
        super().__init__()
        self.train, self.val = train, val
        self.classifier = classifier
        self.data_seed, self.batch, self.momentum = data_seed, batch, momentum
        self.shapley = shapley  # the run logs Shapley components (diagnostics.attribution=shapley)
        self.phase = 0
        self.checked: list[tuple[int, int]] = []  # (phase, epoch)

    def _bns(self, model):
        return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]

    def on_train_begin(self, logs=None):
        """A phase begins: its batch order, and copies of the random layers seeded as the model's are now."""
        self.phase += 1
        model = self.classifier()
        if self.momentum is not None:
            for bn in self._bns(model):
                bn.momentum = self.momentum
        aug, _, _, _, drop, _ = _blocks(model)
        self.aug = keras.Sequential([_copy(layer) for layer in aug.layers])
        self.drop = _copy(drop)
        for own, theirs in zip(_seeds(self.aug) + _seeds(self.drop), _seeds(aug) + _seeds(drop), strict=True):
            own.assign(theirs.numpy())
        n = len(self.train[1])
        positions = tf.data.Dataset.range(n).shuffle(
            n, seed=self.data_seed + 1_000_003 * self.phase, reshuffle_each_iteration=True
        )
        self.order = iter(positions.batch(self.batch).repeat())
        self.steps = -(-n // self.batch)

    def on_test_begin(self, logs=None):
        self.snapshot = [np.array(v.numpy(), copy=True) for v in self.classifier().variables]

    def on_epoch_end(self, epoch, logs=None):
        model = self.classifier()
        variables = model.variables
        after_meter = [np.array(v.numpy(), copy=True) for v in variables]
        unseeded = [i for i, v in enumerate(variables) if "seed" not in v.path]
        for i in unseeded:
            variables[i].assign(self.snapshot[i])
        _, pre, base, pool, _, head = _blocks(model)
        bn_stats = [v for bn in self._bns(base) for v in (bn.moving_mean, bn.moving_variance)]
        drop_seeds = _seeds(self.drop)
        passes = {name: Pass() for name in (*CONDITIONS, *CORNERS)}
        images, labels = self.train
        for _ in range(self.steps):
            at = next(self.order).numpy()
            x, y = images[at], labels[at]
            augmented = self.aug(x, training=True)
            # training mode: batch statistics (Keras assigns the moving ones: put them back at once)
            stats = [np.array(v.numpy(), copy=True) for v in bn_stats]
            f_train = pool(base(pre(augmented), training=True))
            for v, value in zip(bn_stats, stats, strict=True):
                v.assign(value)
            f_moving = pool(base(pre(augmented), training=False))  # MobileNetV2 has no random layers
            mask_state = [np.array(v.numpy(), copy=True) for v in drop_seeds]
            passes["train_mode"].add(self.drop(f_train, training=True), head, y)
            for v, value in zip(drop_seeds, mask_state, strict=True):
                v.assign(value)
            passes["no_batchnorm"].add(self.drop(f_moving, training=True), head, y)
            passes["no_dropout"].add(f_moving, head, y)
            f_clean = pool(base(pre(x), training=False))
            passes["train_clean"].add(f_clean, head, y)
            if self.shapley:  # the other corners: BatchNorm on with dropout off, and the clean images
                c_train = pool(base(pre(x), training=True))
                for v, value in zip(bn_stats, stats, strict=True):
                    v.assign(value)
                passes["dropout"].add(f_train, head, y)
                passes["dropout+augmentation"].add(c_train, head, y)
                for name, features in (("augmentation", c_train), ("batchnorm+augmentation", f_clean)):
                    for v, value in zip(drop_seeds, mask_state, strict=True):
                        v.assign(value)
                    passes[name].add(self.drop(features, training=True), head, y)
        for name in CONDITIONS:
            passes[name].compare(logs[f"{name}_accuracy"], logs[f"{name}_loss"], name)
        if self.shapley:
            _compare_shapley(passes, logs)
        val = independent_passes(model, self.val, self.val, self.batch)[1]
        val.compare(logs["val_accuracy"], logs["val_loss"], "val")
        # measuring changed nothing the next epoch reads: the meter left the end-of-epoch values
        for i in unseeded:
            np.testing.assert_array_equal(self.snapshot[i], after_meter[i], err_msg=variables[i].path)
            variables[i].assign(after_meter[i])
        self.checked.append((self.phase, epoch))


def train_with(monkeypatch, cfg, check: IndependentCheck | None = None) -> mlflow.entities.Run:
    """Train ``cfg`` in a new MLflow run, with ``check`` riding along every ``fit`` (both phases) and handed
    the classifier the run builds (the real one, kept as ``build_classifier`` returns it); the run as
    MLflow stored it."""
    built, build, fit = [], train_module.build_classifier, train_module.fit_epochs

    def keep(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    def fit_with_check(model, batches, steps, val, first_epoch, epochs, callbacks, verbose):
        fit(model, batches, steps, val, first_epoch, epochs, [*callbacks, check], verbose)

    monkeypatch.setattr(train_module, "build_classifier", keep)
    if check is not None:
        check.classifier = lambda: built[-1].model
        monkeypatch.setattr(train_module, "fit_epochs", fit_with_check)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    with mlflow.start_run() as run:
        train_module.train_and_log(cfg)
    return mlflow.MlflowClient(cfg.tracking.uri).get_run(run.info.run_id)

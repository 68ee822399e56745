"""``check(model)``: the three fine-tuning questions answered for the user's own model, one line each.

Before or after ``fit``, it reads the model as it is now (what is trainable, what ``compile`` built, how
the base is called) and what the Keras installed does with ``training=False`` during ``fit``, measured by
``probe()`` on tiny models at call time. Given the data, it also checks the split. Every finding says its
fix. See docs/notebook.md."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from .data import as_split
from .keras_probe import KerasBehaviour, probe
from .layers import augmentation_layers, batchnorm_layers, dropout_layers, walk_layers
from .parts import _graph, ordered_nodes
from .scoring import accuracy_metric

Severity = Literal["problem", "ok", "note"]


@dataclass(frozen=True)
class Finding:
    """One line of ``check``: ``severity`` ("problem", "note" or "ok"), what was found, and the fix."""

    severity: Severity
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.severity.upper()}: {self.message}.{fix}"


def _nested_models(model: keras.Model) -> list[tuple[int, keras.Model]]:
    return [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, keras.Model) and layer.weights]


def _flagged_calls(model: keras.Model) -> list:
    """The model's top-level calls given ``training=False`` at construction, in order."""
    graph = _graph(model)
    if graph is None:
        return []
    return [node for node in ordered_nodes(graph) if node.arguments.kwargs.get("training") is False]


def _same_base(model: keras.Model, base: keras.Model | None) -> list[Finding]:
    """Question 1: the outer model holds the very object the user (un)froze."""
    if base is not None:
        index = next((i for i, layer in enumerate(model.layers) if layer is base), None)
        if index is None and not any(layer is base for layer in walk_layers(model)):
            return [
                Finding(
                    "problem",
                    f"{base.name} is not inside {model.name}: (un)freezing it changes nothing {model.name} trains",
                    f"unfreeze the base the model holds, e.g. base = model.layers[i] (one of "
                    f"{', '.join(f'model.layers[{i}] {m.name}' for i, m in _nested_models(model)) or 'none'})",
                )
            ]
        found = [(index, base)] if index is not None else []
    else:
        found = _nested_models(model)
    out = []
    for i, nested in found:
        trainable = sum(1 for layer in nested.layers if layer.trainable_weights)
        out.append(
            Finding(
                "ok",
                f"model.layers[{i}] is {nested.name} itself (the same object): its trainable flags act on "
                f"{model.name} at once ({trainable} of {len(nested.layers)} layers with trainable weights now)",
            )
        )
    return out


def _variable_ids(variables) -> set[int]:
    return {id(v) for v in variables}


def _compiled_set(model: keras.Model) -> list[Finding]:
    """Question 1's trap: ``fit`` trains the set the optimizer was built for, until a recompile."""
    optimizer = getattr(model, "optimizer", None)
    built_for = getattr(optimizer, "_trainable_variables", None)
    if optimizer is None or not getattr(optimizer, "built", False) or built_for is None:
        return []
    if _variable_ids(built_for) == _variable_ids(model.trainable_variables):
        return [Finding("ok", f"{model.name}'s optimizer was built for the weights trainable now")]
    return [
        Finding(
            "problem",
            f"the trainable set changed since the last compile ({len(built_for)} weights then, "
            f"{len(model.trainable_variables)} now): fit still trains the old set, or fails for new weights",
            "model.compile(optimizer=keras.optimizers.Adam(learning_rate=...), loss=..., metrics=...) with a NEW "
            "optimizer object (the built one cannot take another set)",
        )
    ]


def _batchnorm(model: keras.Model, behaviour: KerasBehaviour) -> list[Finding]:
    """Question 3: unfrozen BatchNorm, and whether ``training=False`` keeps it in inference mode here."""
    out = []
    flagged = [node.operation for node in _flagged_calls(model) if isinstance(node.operation, keras.Model)]
    for nested in flagged:
        unfrozen = [bn for bn in batchnorm_layers(nested) if bn.trainable]
        if not unfrozen:
            continue
        if behaviour.training_false_keeps_bn_frozen:
            out.append(
                Finding(
                    "ok",
                    f"{len(unfrozen)} BatchNormalization layers of {nested.name} are trainable, and in Keras "
                    f"{behaviour.keras_version} {nested.name}(x, training=False) keeps them in inference mode during "
                    f"fit (probe: moving mean moved {behaviour.bn_moving_mean_change:g})",
                )
            )
            continue
        out.append(
            Finding(
                "problem",
                f"{len(unfrozen)} BatchNormalization layers of {nested.name} are trainable, and in Keras "
                f"{behaviour.keras_version} {nested.name}(x, training=False) does NOT keep them in inference mode "
                f"during fit (probe: moving mean moved {behaviour.bn_moving_mean_change:g} in one step): they "
                "normalise with batch statistics and their moving statistics follow your batches",
                f"set trainable = False on every keras.layers.BatchNormalization in {nested.name}.layers, then "
                "recompile with a new optimizer",
            )
        )
    others = [
        bn for bn in batchnorm_layers(model) if bn.trainable and not any(bn in batchnorm_layers(m) for m in flagged)
    ]
    if others:
        out.append(
            Finding(
                "note",
                f"{len(others)} BatchNormalization layers train (called without training=False): during fit they "
                "normalise with batch statistics and move their moving statistics",
                "if that is not meant, set their trainable = False (a non-trainable BatchNorm always uses its "
                "moving statistics) and recompile with a new optimizer",
            )
        )
    return out


def _dropout_after_flag(model: keras.Model, behaviour: KerasBehaviour) -> list[Finding]:
    """The next Keras: a Dropout after ``base(x, training=False)`` is off during fit."""
    graph = _graph(model)
    flagged = _flagged_calls(model)
    if graph is None or not flagged or behaviour.dropout_after_training_false_active:
        return []
    nodes = ordered_nodes(graph)
    first = min(nodes.index(node) for node in flagged)
    after = [node.operation for node in nodes[first + 1 :] if node.operation in dropout_layers(model)]
    if not after:
        return []
    names = ", ".join(layer.name for layer in after)
    return [
        Finding(
            "problem",
            f"in Keras {behaviour.keras_version} a Dropout placed after a call given training=False is OFF during "
            f"fit (probe: fit loss {behaviour.dropout_fit_loss:g} = inference loss "
            f"{behaviour.dropout_inference_loss:g}): {names} does not regularize",
            "call the base without training=False and keep its BatchNormalization layers trainable=False instead",
        )
    ]


def _from_logits(loss) -> bool:
    config = loss.get_config() if hasattr(loss, "get_config") else {}
    return bool(config.get("from_logits"))


def _accuracy_on_logits(model: keras.Model) -> list[Finding]:
    """The course's bug: ``metrics=['accuracy']`` with ``from_logits=True`` thresholds logits at 0.5."""
    loss = getattr(model, "loss", None)
    if loss is None or not _from_logits(loss) or model.outputs is None or model.output_shape[-1] != 1:
        return []
    metric = accuracy_metric(model)
    if metric is not None:
        fn_name = getattr(metric._fn, "__name__", "")
        threshold = metric._fn_kwargs.get("threshold", 0.5)
        wrong = fn_name == "binary_accuracy" and threshold != 0.0
        name = metric.name
    else:  # compiled but not fitted yet: Keras resolves 'accuracy' at the first step
        metrics = (model.get_compile_config() or {}).get("metrics") or []
        named = [m for m in metrics if isinstance(m, str) and m.lower() in ("accuracy", "acc", "binary_accuracy")]
        configured = [m for m in metrics if isinstance(m, dict) and m.get("class_name") == "BinaryAccuracy"]
        wrong = bool(named) or any(m["config"].get("threshold", 0.5) != 0.0 for m in configured)
        threshold = 0.5
        name = named[0] if named else "accuracy"
    if not wrong:
        return []
    return [
        Finding(
            "problem",
            f"the loss takes logits (from_logits=True) but the accuracy metric {name!r} thresholds them at "
            f"{threshold:g}: a logit of 0.3 (probability 0.57) counts as class 0, so accuracy is wrong",
            f"metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name={name!r})] (or a sigmoid output)",
        )
    ]


def _bare_call(model: keras.Model, behaviour: KerasBehaviour) -> list[Finding]:
    augmenting = augmentation_layers(model)
    if not augmenting or not behaviour.bare_call_augments:
        return []
    return [
        Finding(
            "note",
            f"{model.name}(x) augments: its {len(augmenting)} random preprocessing layers run in training mode in a "
            f"bare call (probe, Keras {behaviour.keras_version}); predict and evaluate never augment",
            "predict with model.predict(x) or model(x, training=False)",
        )
    ]


def _digests(dataset: tf.data.Dataset) -> list[bytes]:
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() for batch, _ in dataset for x in batch.numpy()]


def _reshuffling_take_skip(dataset: tf.data.Dataset) -> bool:
    """Whether ``dataset`` takes or skips part of a dataset that reshuffles on every pass."""

    def reshuffles(d: tf.data.Dataset) -> bool:
        own = "Shuffle" in type(d).__name__ and getattr(d, "_reshuffle_each_iteration", True)
        return own or any(reshuffles(i) for i in d._inputs())

    def walk(d: tf.data.Dataset) -> bool:
        if type(d).__name__ in ("_TakeDataset", "_SkipDataset") and reshuffles(d):
            return True
        return any(walk(i) for i in d._inputs())

    return walk(dataset)


def _split(train_data, validation_data) -> list[Finding]:
    """A validation split that is not disjoint from the training split, or not the same on every pass."""
    out = []
    if isinstance(validation_data, tf.data.Dataset) and _reshuffling_take_skip(validation_data):
        out.append(
            Finding(
                "problem",
                "validation_data is a take()/skip() of a dataset that reshuffles on every pass: its membership "
                "changes every epoch, so images move between it and the part you split off",
                "split by file: image_dataset_from_directory(..., validation_split=v, subset='both', seed=s)",
            )
        )
    train, _ = as_split(train_data, what="train_data")
    val, _ = as_split(validation_data, what="validation_data")
    seen = set(_digests(train))
    val_digests = _digests(val)
    shared = sum(1 for d in val_digests if d in seen)
    if shared:
        out.append(
            Finding(
                "problem",
                f"{shared} of {len(val_digests)} validation images are exact copies of training images: "
                "validation measures memory, not generalisation",
                "split by file with one seed for both subsets (subset='both'), and remove duplicate files",
            )
        )
    else:
        out.append(Finding("ok", f"none of the {len(val_digests)} validation images is a copy of a training image"))
    return out


def not_keras3(model) -> Finding | None:
    """A model of another Keras (tf-keras 2's, under ``TF_USE_LEGACY_KERAS=1``): check and GapCallback read
    Keras 3 models only, the probe measures either (docs/notebook.md, "Which Keras")."""
    if isinstance(model, keras.Model):
        return None
    return Finding(
        "problem",
        f"{getattr(model, 'name', model)} is a {type(model).__module__.split('.')[0]} model, not a Keras "
        f"{keras.__version__} one: check and GapCallback read Keras 3 models only",
        "build the model with Keras 3 (import keras, TF_USE_LEGACY_KERAS unset); for Keras 2's answer to the "
        "BatchNorm question run probe(tf.keras)",
    )


def check(
    model: keras.Model,
    train_data=None,
    validation_data=None,
    *,
    base: keras.Model | None = None,
    verbose: bool = True,
) -> list[Finding]:
    """The fine-tuning questions answered for ``model`` as it is now: one ``Finding`` per line, printed
    (``verbose``) and returned.

    Args:
        model: the Keras model, before or after ``compile``/``fit``.
        train_data: the training split as you pass it to ``fit`` (with ``validation_data``: the split check).
        validation_data: the validation split as you pass it to ``fit``.
        base: the base model you froze or unfroze, to check the model holds that very object.
        verbose: print the findings.
    """
    other = not_keras3(model)
    if other is not None:
        if verbose:
            print(other)
        return [other]
    behaviour = probe()
    findings = [
        *_same_base(model, base),
        *_compiled_set(model),
        *_batchnorm(model, behaviour),
        *_dropout_after_flag(model, behaviour),
        *_accuracy_on_logits(model),
        *_bare_call(model, behaviour),
    ]
    if train_data is not None and validation_data is not None:
        findings += _split(train_data, validation_data)
    if verbose:
        for finding in findings:
            print(finding)
    return findings

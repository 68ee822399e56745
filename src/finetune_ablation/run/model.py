"""The classifier: augmentation -> preprocess -> pretrained base -> pooling -> dropout -> logits, built from
Keras's own layers only, so a logged model loads in any Python with Keras (docs/run-record.md, "The model").

Keeps a handle on every block (the frozen inputs build the model above them from these: feature_cache; the
gap measurement finds the stages by walking the graph, gap/parts.py), and answers the users' questions about
freezing in numbers (trainable counts, BN drift, whether the outer model holds the very same base object)."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from ..config import ModelConfig
from ..errors import UserError
from ..gap.layers import batchnorm_layers, copy_values, moving_statistics, walk_layers

# What keras.applications' ``preprocess_input`` computes, by the ``mode`` of imagenet_utils it calls: the
# ImageNet channel means and standard deviations of the "torch" and "caffe" modes (caffe's in BGR order).
_TORCH_MEAN, _TORCH_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])
# How close a built-in layer must come to ``preprocess_input``: a few float32 roundings of the output's size
# (``x * (1 / 127.5) - 1`` and ``x / 127.5 - 1`` may differ in the last bit).
_PREPROCESS_ULPS = 4


def _builtin_preprocessing(mode: str) -> keras.layers.Layer:
    """One of ``preprocess_input``'s four modes as a layer of Keras itself, so a saved model loads in any Python
    with Keras (no class of this package to import first)."""
    if mode == "identity":  # efficientnet, mobilenet_v3, convnext, ...: the base normalises inside itself
        return keras.layers.Identity(name="preprocess")
    if mode == "tf":  # mobilenet_v2, inception_v3, xception, ...: pixels to [-1, 1]
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")
    if mode == "torch":  # densenet: [0, 1], then each channel standardised
        return keras.layers.Rescaling(1 / (255 * _TORCH_STD), offset=-_TORCH_MEAN / _TORCH_STD, name="preprocess")
    if mode == "caffe":  # resnet50, vgg16, ...: RGB to BGR, then each channel's mean subtracted
        # a fixed 1x1 convolution: a channel permutation (products with 1 and 0 are exact) plus -mean as bias
        layer = keras.layers.Conv2D(3, 1, trainable=False, name="preprocess")
        layer.build((None, None, None, 3))
        layer.set_weights([np.eye(3)[::-1].reshape(1, 1, 3, 3), -_CAFFE_MEAN_BGR])
        return layer
    raise ValueError(f"unknown preprocessing mode {mode!r}")


PREPROCESSING_MODES = ("identity", "tf", "torch", "caffe")


def _probe_pixels() -> np.ndarray:
    """Every integer pixel value in every channel, and values between them: one small batch."""
    values = np.concatenate([np.arange(256.0), np.linspace(0.0, 255.0, 256 * 5 + 1)[:-1] + 0.37])
    return values[: (len(values) // 48) * 48].reshape(-1, 4, 4, 3).astype("float32")


def preprocessing_layer(module_name: str) -> keras.layers.Layer:
    """The base's ``preprocess_input`` as a built-in Keras layer named ``preprocess``: the mode whose layer gives
    the same numbers as ``preprocess_input`` itself on every pixel value, to a few float32 roundings (checked
    here, at build time, so a module that computes something else is refused, never silently changed)."""
    reference = _applications_module(module_name).preprocess_input
    pixels = _probe_pixels()
    expected = np.asarray(reference(pixels.copy()))  # a copy: it changes float NumPy input in place
    tolerance = _PREPROCESS_ULPS * np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(expected))))
    for mode in PREPROCESSING_MODES:
        layer = _builtin_preprocessing(mode)
        if float(np.max(np.abs(np.asarray(layer(pixels)) - expected))) <= tolerance:
            return layer
    raise UserError(
        f"keras.applications.{module_name}.preprocess_input is none of the preprocessings the suite builds from "
        f"Keras's own layers ({', '.join(PREPROCESSING_MODES)}): pick another model.name"
    )


@keras.saving.register_keras_serializable(package="finetune_ablation")
class Preprocess(keras.layers.Layer):
    """Only to load models logged before the preprocessing became a built-in layer (``preprocessing_layer``):
    those need ``import finetune_ablation.run.model`` first. New models never use it."""

    def __init__(self, module: str, **kwargs):
        super().__init__(**kwargs)
        self.module = module
        self._fn = _applications_module(module).preprocess_input

    def call(self, inputs):
        return self._fn(inputs)

    def get_config(self):
        return {**super().get_config(), "module": self.module}


@dataclass
class Classifier:
    model: keras.Model
    base: keras.Model
    augmentation: keras.Sequential
    preprocess: keras.layers.Layer  # built-in layers only (preprocessing_layer)
    pool: keras.layers.Layer
    dropout: keras.layers.Dropout
    head: keras.layers.Dense
    bn_training: bool | None

    @property
    def binary(self) -> bool:
        return self.head.units == 1

    @property
    def pooled_shape(self) -> tuple[int, ...]:
        """Shape of one image's pooled features (no batch dimension)."""
        return tuple(self.pool.compute_output_shape(self.base.output_shape)[1:])


def _applications_module(name: str):
    """Only modules inside ``keras.applications`` can be named: config never imports arbitrary code."""
    if not name.isidentifier():
        raise UserError(f"model.name={name!r} is not a keras.applications module name, e.g. mobilenet_v2")
    try:
        module = importlib.import_module(f"keras.applications.{name}")
    except ImportError:
        raise UserError(
            f"model.name={name!r} is not a keras.applications module: use e.g. mobilenet_v2, efficientnet, "
            "resnet50 (see conf/model/)"
        ) from None
    if not hasattr(module, "preprocess_input"):
        raise UserError(f"keras.applications.{name} has no preprocess_input: pick an image base module")
    return module


def _download_hint(exc: Exception) -> UserError:
    return UserError(
        f"could not download the ImageNet weights ({type(exc).__name__}): this machine may be offline. "
        "Use model.weights=null (random init) or model.weights=/path/to/file.weights.h5, or put the file "
        "in $KERAS_HOME/models (default ~/.keras/models)"
    )


def _demo_weights(cfg: ModelConfig) -> str:
    """``model.weights=demo``: the offline base shipped with the package (demo_base.py), checked against
    its card; the card is logged with the run. Its weights fit any image size, not another width."""
    from ..demo_base import BASES_DIR, WEIGHTS_NAME, demo_card, log_card
    from ..fingerprints import file_sha256

    card = demo_card()
    if (cfg.name, cfg.architecture, cfg.alpha) != ("mobilenet_v2", card["architecture"], card["alpha"]):
        raise UserError(
            f"model.weights=demo is a MobileNetV2 with alpha={card['alpha']}: set model.alpha={card['alpha']} "
            "(and model=mobilenet_v2), or use experiment=demo"
        )
    path = BASES_DIR / WEIGHTS_NAME
    if file_sha256(path) != card["sha256"]:
        raise UserError(f"{path} does not match its card's sha256: reinstall the package or run ablate-pretrain")
    log_card(card)
    return str(path)


def load_base(cfg: ModelConfig, image_size: int) -> keras.Model:
    """Build ``keras.applications.<name>.<architecture>`` headless, with the requested weights."""
    module = _applications_module(cfg.name)
    constructor = getattr(module, cfg.architecture, None)
    if constructor is None or not callable(constructor) or not cfg.architecture[:1].isupper():
        raise UserError(
            f"model.architecture={cfg.architecture!r} is not a constructor in keras.applications.{cfg.name}"
        )
    kwargs: dict = {"include_top": False, "input_shape": (image_size, image_size, 3)}
    if cfg.alpha is not None:
        if "alpha" not in inspect.signature(constructor).parameters:
            raise UserError(f"{cfg.architecture} has no width multiplier: set model.alpha=null")
        kwargs["alpha"] = cfg.alpha
    weights = cfg.weights
    if weights == "demo":
        weights = _demo_weights(cfg)
    elif weights not in (None, "imagenet"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.weights={weights} is not a file: use imagenet, null, demo, or a local .weights.h5/.h5 path"
            )
        weights = str(path)
    try:
        return constructor(weights=weights, **kwargs)
    except (OSError, ConnectionError) as exc:  # urllib's URLError is an OSError
        if weights == "imagenet":
            raise _download_hint(exc) from None
        raise UserError(f"cannot load model.weights={weights}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"cannot build {cfg.architecture} with these settings: {exc}") from None
    except Exception as exc:  # Keras wraps fetch failures in a plain Exception("URL fetch failure ...")
        if weights == "imagenet" and "fetch" in str(exc).lower():
            raise _download_hint(exc) from None
        raise


def build_classifier(
    cfg: ModelConfig, base: keras.Model, augmentation: keras.Sequential, num_classes: int, image_size: int
) -> Classifier:
    """The course's model, with logits out: one unit for two classes, ``num_classes`` units otherwise."""
    preprocess = preprocessing_layer(cfg.name)
    pool = keras.layers.GlobalAveragePooling2D(name="pool")
    dropout = keras.layers.Dropout(cfg.dropout, name="dropout")
    head = keras.layers.Dense(1 if num_classes == 2 else num_classes, name="logits")

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = augmentation(inputs)
    x = preprocess(x)
    x = base(x) if cfg.bn_training is None else base(x, training=cfg.bn_training)
    x = pool(x)
    x = dropout(x)
    outputs = head(x)
    model = keras.Model(inputs, outputs, name="classifier")
    return Classifier(model, base, augmentation, preprocess, pool, dropout, head, cfg.bn_training)


def calibrate_batchnorm(base: keras.Model, preprocess: keras.layers.Layer, images: np.ndarray) -> None:
    """Set every BN moving mean/variance to the statistics of ``images`` (one training-mode pass with
    momentum 0). A randomly initialised base (``weights=null``) has moving statistics (0, 1) that do
    not match its activations, which then vanish through the depth; calibrated, its features carry
    signal and a head can learn from them, so the offline demo is meaningful."""
    bns = batchnorm_layers(base)
    saved = [(bn.momentum, bn.trainable) for bn in bns]
    for bn in bns:
        bn.momentum, bn.trainable = 0.0, True
    try:
        base(preprocess(images), training=True)
    finally:
        for bn, (momentum, trainable) in zip(bns, saved, strict=True):
            bn.momentum, bn.trainable = momentum, trainable


def resolve_fine_tune_at(base: keras.Model, fine_tune_at: int | str) -> int:
    """A layer index or name -> index into ``base.layers`` (clipped: beyond the end unfreezes nothing)."""
    names = [layer.name for layer in base.layers]
    if isinstance(fine_tune_at, str):
        if fine_tune_at not in names:
            raise UserError(
                f"model.fine_tune_at={fine_tune_at!r} names no layer of {base.name}: use an index "
                f"0..{len(names)} or a layer name such as {names[len(names) * 3 // 4]!r}"
            )
        return names.index(fine_tune_at)
    return min(int(fine_tune_at), len(names))


def freeze_base(base: keras.Model) -> None:
    """Phase 1: the whole base is non-trainable (a non-trainable BN always uses its moving statistics)."""
    base.trainable = False


def unfreeze_top(base: keras.Model, fine_tune_at: int, freeze_bn: bool) -> str | None:
    """Phase 2: unfreeze ``base.layers[fine_tune_at:]``; returns the first unfrozen layer's name."""
    base.trainable = True
    # Set every layer explicitly: Keras 3 skips propagating ``base.trainable = True`` when the flag is
    # already True, which would leave layers frozen one by one earlier still frozen.
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= fine_tune_at
    if freeze_bn:
        for bn in batchnorm_layers(base):
            bn.trainable = False
    return base.layers[fine_tune_at].name if fine_tune_at < len(base.layers) else None


def compile_for_fit(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss, metrics: list) -> None:
    """``compile``, then make the optimizer's variables at once: left to ``fit``, the optimizer creates them
    inside the train step's first trace, and TensorFlow then traces the whole step a second time (the same
    numbers, twice the trace; docs/stack-facts.md K11)."""
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    model.optimizer.build(model.trainable_variables)


def bn_moving_stats(base: keras.Model) -> list[np.ndarray]:
    """Copies of every BN moving mean and variance, to measure how much a phase moved them."""
    return copy_values(moving_statistics(base))


def max_abs_change(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    return max((float(np.max(np.abs(a - b))) for a, b in zip(before, after, strict=True)), default=0.0)


def count_params(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def trainable_summary(clf: Classifier) -> dict[str, float | int | str | bool]:
    """What is trainable right now, and proof that the outer model holds the base object itself."""
    base_trainable = count_params(clf.base.trainable_weights)
    return {
        "trainable_layers": sum(
            1 for layer in walk_layers(clf.base) if layer.trainable_weights and not hasattr(layer, "layers")
        ),
        "trainable_params_base": base_trainable,
        "trainable_params_head": count_params(clf.model.trainable_weights) - base_trainable,
        "base_is_model_layer": any(layer is clf.base for layer in clf.model.layers),
    }


def trainable_report(clf: Classifier) -> str:
    """A line per base layer: index, name, type, trainable flag, weight count."""
    lines = [f"{'idx':>4}  {'layer':<32} {'type':<24} {'trainable':<9} params"]
    for i, layer in enumerate(clf.base.layers):
        lines.append(
            f"{i:>4}  {layer.name:<32} {type(layer).__name__:<24} {layer.trainable!s:<9} {count_params(layer.weights)}"
        )
    summary = trainable_summary(clf)
    lines.append("")
    lines.extend(f"{key}: {value}" for key, value in summary.items())
    return "\n".join(lines)

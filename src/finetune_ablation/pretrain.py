"""``ablate-pretrain``: make the offline demo's pretrained base (``model.weights=demo``).

No weights can be downloaded on the machines this suite targets, and a randomly initialised base gives
features a head cannot use, so the demo could never show what the course shows. This command trains a
small MobileNetV2 (alpha 0.35) from scratch on a generated SOURCE task: 24 classes, six shapes (triangle,
arrow, tee, ell, lollipop, crescent) times four orientations (pointing up, right, down or left), in random
textures, colours, sizes and positions on random backgrounds. Its features are outlines and which way
they point, which is what the demo's TARGET task (animal silhouettes with the head up or low,
demo_data.py) needs, but the task is a different one, so the demo really transfers features.

Keras's MobileNetV2 builds its BatchNormalization layers with momentum 0.999: after a few hundred steps
from scratch their moving statistics are still near their initial (0, 1), and the base in inference
mode (frozen, as in phase 1) is at chance. So pretraining runs BN at momentum 0.9 and, at the end, sets
every moving mean and variance to the trained base's own statistics over training images.

It writes the base without its top (``demo_base.weights.h5``) and a card (``demo_base.json``: source
task, seed, epochs, source accuracy, sha256 of the weights file, package versions). The shipped pair
lives in ``finetune_ablation/bases/``. Deterministic for a seed on one machine (op determinism on CPU);
another CPU may round differently, so there the file's bytes, not what it does, can differ.

    ablate-pretrain                 # the shipped base (about 15 minutes on 2 busy cores)
    ablate-pretrain --quick --out /tmp/base   # tiny settings, same code path (seconds)"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .demo_base import BASES_DIR, CARD_NAME, WEIGHTS_NAME
from .demo_data import TEXTURES, background, paint, texture, to_image
from .fingerprints import file_sha256, versions

SHAPES = ("triangle", "arrow", "tee", "ell", "lollipop", "crescent")
ORIENTATIONS = ("up", "right", "down", "left")  # where the shape points, give or take 20 degrees
SOURCE_CLASSES = tuple(f"{shape}/{where}" for shape in SHAPES for where in ORIENTATIONS)
CALIBRATION_IMAGES = 512
BN_MOMENTUM = 0.9  # Keras's MobileNetV2 uses 0.999: its moving statistics lag a few hundred steps behind
HELD_OUT = 1_000_000  # the source_split part that no epoch trains on


@dataclass(frozen=True)
class Settings:
    """Everything that decides the weights (recorded on the card)."""

    seed: int = 7
    image_size: int = 64
    alpha: float = 0.35
    train_per_class: int = 150
    val_per_class: int = 40
    epochs: int = 16
    batch_size: int = 32
    learning_rate: float = 2e-3


FULL = Settings()
QUICK = replace(FULL, train_per_class=4, val_per_class=2, epochs=1, batch_size=16)


def _polygon(cx: float, cy: float, radius: float, angle: float, points: list[tuple[float, float]]):
    """Unit-square points (pointing up: negative y) scaled, rotated by ``angle`` and moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in points]


# Outlines pointing UP (image y grows downwards); none looks the same after a quarter or half turn.
_OUTLINES = {
    "triangle": [(0, -1), (0.55, 0.85), (-0.55, 0.85)],
    "arrow": [(0, -1), (0.65, -0.25), (0.22, -0.25), (0.22, 1), (-0.22, 1), (-0.22, -0.25), (-0.65, -0.25)],
    "tee": [(-0.8, -1), (0.8, -1), (0.8, -0.55), (0.22, -0.55), (0.22, 1), (-0.22, 1), (-0.22, -0.55), (-0.8, -0.55)],
    "ell": [(-0.55, -1), (-0.1, -1), (-0.1, 0.55), (0.65, 0.55), (0.65, 1), (-0.55, 1)],
    "stem": [(-0.14, -0.35), (0.14, -0.35), (0.14, 1), (-0.14, 1)],
}


def shape_mask(rng: np.random.Generator, shape: str, orientation: int, size: int) -> Image.Image:
    """An L-mode mask of one shape pointing in ``ORIENTATIONS[orientation]`` (plus up to 20 degrees
    either way), at a random place and size."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    angle = orientation * math.pi / 2 + rng.uniform(-1, 1) * math.radians(20)

    def at(x: float, y: float) -> tuple[float, float]:
        return _polygon(cx, cy, radius, angle, [(x, y)])[0]

    if shape in _OUTLINES:
        draw.polygon(_polygon(cx, cy, radius, angle, _OUTLINES[shape]), fill=255)
    elif shape == "lollipop":  # a round head on a stem
        draw.polygon(_polygon(cx, cy, radius, angle, _OUTLINES["stem"]), fill=255)
        hx, hy, r = *at(0, -0.55), 0.45 * radius
        draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=255)
    elif shape == "crescent":  # a disc with a bite taken from the side it points to
        r = 0.8 * radius
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        bx, by = at(0, -0.5)
        draw.ellipse((bx - r, by - r, bx + r, by + r), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def draw_source(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One source-task image of class ``SOURCE_CLASSES[label]``, in a random fill texture and colours."""
    shape, where = SOURCE_CLASSES[label].split("/")
    canvas = background(rng, size)
    fill = texture(rng, str(rng.choice(TEXTURES)), size)
    paint(canvas, shape_mask(rng, shape, ORIENTATIONS.index(where), size), fill)
    return to_image(canvas)


def source_split(per_class: int, size: int, seed: int, part: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every source class (float32 pixels 0..255, classes interleaved); each
    ``part`` (an epoch, or the held-out set) is a different draw."""
    rng = np.random.default_rng([seed, part])
    labels = np.tile(np.arange(len(SOURCE_CLASSES)), per_class)
    images = np.stack([np.asarray(draw_source(rng, int(y), size), dtype=np.float32) for y in labels])
    return images, labels.astype(np.int32)


def _versions() -> dict[str, str]:
    return {"python": sys.version.split()[0], **versions(("tensorflow", "keras", "numpy", "pillow"))}


def pretrain(settings: Settings, out_dir: Path, verbose: int = 0) -> dict:
    """Train the base on the source task, write weights (no top) and card into ``out_dir``; returns the card."""
    import keras
    import tensorflow as tf

    from .gap.layers import batchnorm_layers
    from .run.model import calibrate_batchnorm, compile_for_fit

    keras.backend.clear_session()
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    size = settings.image_size
    x_val, y_val = source_split(settings.val_per_class, size, settings.seed, HELD_OUT)

    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=settings.alpha, include_top=False, weights=None
    )
    for bn in batchnorm_layers(base):
        bn.momentum = BN_MOMENTUM  # a training parameter, not stored in the weights file
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # as mobilenet_v2.preprocess_input
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    model = keras.Model(inputs, keras.layers.Dense(len(SOURCE_CLASSES))(x))
    steps = settings.epochs * math.ceil(settings.train_per_class * len(SOURCE_CLASSES) / settings.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(settings.learning_rate, steps)
    compile_for_fit(
        model,
        keras.optimizers.Adam(schedule),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    started = time.perf_counter()
    for epoch in range(settings.epochs):  # fresh images every epoch: a small base memorises a fixed set
        x_train, y_train = source_split(settings.train_per_class, size, settings.seed, epoch)
        batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(settings.batch_size)
        # shuffle=False says what happens: Keras never shuffles a tf.data.Dataset (it warns about the default
        # shuffle=True and ignores it), so the batches come in the draw's order, classes interleaved
        model.fit(
            batches,
            validation_data=(x_val, y_val),
            initial_epoch=epoch,
            epochs=epoch + 1,
            verbose=verbose,
            shuffle=False,
        )
    # Even at momentum 0.9 the moving BN statistics trail the weights by a few steps: set them exactly to
    # the trained base's statistics over training images (x_train: the last epoch's draw, classes
    # interleaved), so that inference mode (a frozen base) sees what training mode saw.
    calibrate_batchnorm(base, lambda images: images / 127.5 - 1, x_train[:CALIBRATION_IMAGES])
    seconds = time.perf_counter() - started
    _, train_accuracy = model.evaluate(x_train, y_train, batch_size=256, verbose=0)
    _, val_accuracy = model.evaluate(x_val, y_val, batch_size=256, verbose=0)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    base.save_weights(weights)
    card = {
        "name": "demo",
        "architecture": "MobileNetV2",
        "alpha": settings.alpha,
        "include_top": False,
        "weights_file": WEIGHTS_NAME,
        "sha256": file_sha256(weights),
        "source_task": {
            "description": "generated: 6 shapes x 4 orientations (up, right, down, left, +-20 degrees) in "
            "random fill textures, colours, sizes, positions and backgrounds (finetune_ablation.pretrain.draw_source)",
            "classes": list(SOURCE_CLASSES),
            "train_images": len(x_train) * settings.epochs,  # a fresh draw every epoch
            "val_images": len(x_val),
        },
        "settings": asdict(settings),
        "epochs": settings.epochs,
        "seed": settings.seed,
        "source_train_accuracy": round(float(train_accuracy), 4),
        "source_val_accuracy": round(float(val_accuracy), 4),
        "chance_accuracy": round(1 / len(SOURCE_CLASSES), 4),
        "train_seconds": round(seconds, 1),
        "versions": _versions(),
        "command": "ablate-pretrain" if settings == FULL else "ablate-pretrain (custom settings)",
    }
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ablate-pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BASES_DIR, help="folder for the weights and card")
    parser.add_argument("--quick", action="store_true", help="tiny settings, same code path (for tests)")
    parser.add_argument("--seed", type=int, default=None, help=f"default {FULL.seed}")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {FULL.epochs}")
    args = parser.parse_args(argv)
    from . import console
    from .errors import run_cli

    run_cli(console.quiet_startup)  # a broken TensorFlow is one error line, as in every console script
    settings = QUICK if args.quick else FULL
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    card = pretrain(settings, args.out, verbose=2)
    print(
        f"wrote {args.out / WEIGHTS_NAME} (sha256 {card['sha256'][:16]}...): source accuracy "
        f"{card['source_val_accuracy']:.3f} on {card['source_task']['val_images']} held-out images "
        f"(chance {card['chance_accuracy']:.3f}), {card['epochs']} epochs in {card['train_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()

"""Generated images, so the suite runs offline and without data: the demo's two-class TARGET task
("alpaca / not alpaca") and the drawing primitives the demo base's SOURCE task (pretrain.py) shares.

Target task: an animal silhouette (body, legs, head) on a cluttered background. An "alpaca" carries its
head on a long upright neck; a "not_alpaca" carries it low, at the height of its body. Colours, textures,
backgrounds, size, position and facing direction are drawn independently of the class, so the mean
colour of an image says nothing about its class: only shape does. The task is upright-sensitive on
purpose (a rotated alpaca looks like a low-headed animal), so the course's rotation augmentation really
does hold training accuracy down, as it does on photographs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from .errors import UserError

CLASSES = ("alpaca", "not_alpaca")
GENERATED_SIZE = 96  # pixels; the data pipeline resizes to data.image_size like any user folder
GENERATOR_VERSION = 2  # bump when the drawing changes, so cached demo folders are regenerated
_MARKER = "demo_dataset.json"
TEXTURES = ("solid", "stripes", "dots")


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A size x size x 3 float image: one colour, or two colours in stripes (any angle) or dots."""
    a, b = random_colour(rng), random_colour(rng)
    while np.abs(a - b).sum() < 150:  # keep the pattern visible
        b = random_colour(rng)
    if kind == "solid":
        return np.broadcast_to(a, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(size / 16, size / 8)
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        on = (np.cos(angle) * xx + np.sin(angle) * yy) % period < period / 2
    elif kind == "dots":
        on = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3.2) ** 2
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return np.where(on[..., None], a, b)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered background: a gradient, or a faint texture, plus pixel noise."""
    if rng.random() < 0.5:
        a, b = random_colour(rng), random_colour(rng)
        t = np.linspace(0, 1, size, dtype=np.float32)
        ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        image = a + (b - a) * np.broadcast_to(ramp, (size, size, 1))
    else:
        pattern = texture(rng, str(rng.choice(TEXTURES)), size)
        image = 0.5 * pattern + 0.5 * pattern.mean(axis=(0, 1))
    return image + rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)


def paint(canvas: np.ndarray, mask: Image.Image, fill: np.ndarray) -> None:
    """Put ``fill`` into ``canvas`` where the L-mode ``mask`` is set (in place)."""
    m = (np.asarray(mask, dtype=np.float32) / 255.0)[..., None]
    canvas *= 1 - m
    canvas += m * fill


def to_image(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _silhouette(rng: np.random.Generator, size: int, long_neck: bool) -> Image.Image:
    """Mask of an animal: body ellipse, four legs, a head on a long upright neck or held low."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s = rng.uniform(0.7, 0.82) * size  # overall scale: the animal nearly fills the image
    bw, bh = s * rng.uniform(0.45, 0.6), s * rng.uniform(0.22, 0.3)
    leg_h, neck_h = s * rng.uniform(0.2, 0.28), s * rng.uniform(0.28, 0.36)
    head = s * rng.uniform(0.13, 0.18)
    total_h = bh + leg_h + (neck_h + head if long_neck else head * 0.5)
    x_high, y_high = size - 2 - bw - head, size - 2 - bh - leg_h
    x0 = rng.uniform(min(2 + head, x_high), x_high)
    y0 = rng.uniform(min(2 + total_h - bh - leg_h, y_high), y_high)  # top of the body (a tall one may touch the top)
    draw.ellipse((x0, y0, x0 + bw, y0 + bh), fill=255)
    leg_w = max(2.0, bw * 0.09)
    for fx in (0.12, 0.3, 0.62, 0.8):
        lx = x0 + fx * bw
        draw.rectangle((lx, y0 + bh * 0.6, lx + leg_w, y0 + bh + leg_h), fill=255)
    front = rng.random() < 0.5  # facing left or right
    nx = x0 + (bw * 0.86 if front else bw * 0.14 - leg_w * 1.5)
    if long_neck:
        draw.rectangle((nx, y0 - neck_h, nx + leg_w * 2, y0 + bh * 0.4), fill=255)
        hy = y0 - neck_h - head * 0.4
    else:
        hy = y0 + rng.uniform(-0.1, 0.35) * bh
    hx = nx + (head * 0.2 if front else -head * 0.7)
    draw.ellipse((hx, hy, hx + head * 1.3, hy + head), fill=255)
    return mask


def draw_target(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One target-task image: class 0 (alpaca) has the long neck, class 1 does not."""
    canvas = background(rng, size)
    paint(canvas, _silhouette(rng, size, long_neck=label == 0), texture(rng, str(rng.choice(TEXTURES)), size))
    return to_image(canvas)


def write_image_folder(
    directory: Path, image_size: int, per_class: int, seed: int, classes: tuple[str, ...] = CLASSES
) -> None:
    """Write ``per_class`` PNGs into one sub-folder per class (deterministic for a seed). With more
    than two classes, classes alternate between the two kinds of animal."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_target(rng, label % 2, image_size).save(folder / f"{name}_{i:03d}.png")


IMAGES_SEED = 42  # the demo's images are one fixed data set: data.seed only chooses its split


def ensure_demo_dataset(directory: str | None, per_class: int, seed: int = IMAGES_SEED) -> None:
    """Generate the demo folder once per settings; later runs (and parallel jobs) reuse it. The images
    do not follow ``data.seed``: jobs of a study that varies the split share one folder."""
    if not directory:
        raise UserError("data.synthetic=true needs data.dir: the folder to write the demo images into")
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    wanted = {
        "image_size": GENERATED_SIZE,
        "per_class": per_class,
        "seed": seed,
        "classes": list(CLASSES),
        "generator": GENERATOR_VERSION,
    }
    with FileLock(str(root / ".demo.lock")):
        marker = root / _MARKER
        if marker.exists() and json.loads(marker.read_text()) == wanted:
            return
        for name in CLASSES:
            for old in (root / name).glob("*.png"):
                old.unlink()
        write_image_folder(root, GENERATED_SIZE, per_class, seed)
        marker.write_text(json.dumps(wanted))

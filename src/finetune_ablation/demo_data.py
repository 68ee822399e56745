"""A small generated two-class image folder, so the suite shows what it does offline and without data.

The classes are learnable but not trivial: "alpaca" images hold a warm ellipse, "not_alpaca" images a
cool rectangle, both on noisy backgrounds at random places and sizes, with some colour overlap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from .errors import UserError

CLASSES = ("alpaca", "not_alpaca")
GENERATED_SIZE = 128  # pixels; the data pipeline resizes to data.image_size like any user folder
_MARKER = "demo_dataset.json"


def _draw(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    grey = rng.integers(90, 170)
    noise = rng.normal(0, 25, size=(size, size, 3))
    pixels = np.clip(grey + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    w, h = rng.integers(size // 2, 4 * size // 5, size=2)
    x, y = rng.integers(0, size - w), rng.integers(0, size - h)
    warm = (int(rng.integers(190, 256)), int(rng.integers(80, 170)), int(rng.integers(0, 80)))
    cool = (int(rng.integers(0, 80)), int(rng.integers(80, 170)), int(rng.integers(190, 256)))
    if rng.random() < 0.1:  # a few look-alikes, so accuracy stays informative
        warm, cool = cool, warm
    if label == 0:
        draw.ellipse((x, y, x + w, y + h), fill=warm)
    else:
        draw.rectangle((x, y, x + w, y + h), fill=cool)
    return image


def write_image_folder(
    directory: Path, image_size: int, per_class: int, seed: int, classes: tuple[str, ...] = CLASSES
) -> None:
    """Write ``per_class`` PNGs into one sub-folder per class (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(rng, label % 2, image_size).save(folder / f"{name}_{i:03d}.png")


def ensure_demo_dataset(directory: str | None, per_class: int, seed: int) -> None:
    """Generate the demo folder once per settings; later runs (and parallel jobs) reuse it."""
    if not directory:
        raise UserError("data.synthetic=true needs data.dir: the folder to write the demo images into")
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    wanted = {"image_size": GENERATED_SIZE, "per_class": per_class, "seed": seed, "classes": list(CLASSES)}
    with FileLock(str(root / ".demo.lock")):
        marker = root / _MARKER
        if marker.exists() and json.loads(marker.read_text()) == wanted:
            return
        for name in CLASSES:
            for old in (root / name).glob("*.png"):
                old.unlink()
        write_image_folder(root, GENERATED_SIZE, per_class, seed)
        marker.write_text(json.dumps(wanted))

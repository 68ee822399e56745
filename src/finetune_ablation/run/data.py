"""The user's image folder as train/validation datasets, checked before any training starts.

Which files count is decided once, in ``image_files`` (no TensorFlow: resume fingerprints a folder with
it before a job knows whether it trains): the scan, the fingerprint and the split all read that list.
The split is Keras's own assignment (``image_dataset_from_directory`` with ``subset="both"`` and the
seed: by file, disjoint), computed on that list rather than by a second walk of the folder that would
see files the scan skipped. Images are decoded with the same ops Keras uses, cached once, and the
training split is reshuffled every epoch from its seed. A second, unshuffled view of the training split
serves the measuring passes, so measuring never advances the training pipeline's shuffle state."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from ..config import DataConfig
from ..errors import UserError
from .image_files import ImageFile, fingerprint, list_images, split_indices


@dataclass
class Datasets:
    train_images: tf.data.Dataset  # training split, unbatched, fixed order (in memory, or streamed when large)
    val: tf.data.Dataset  # fixed order, batched
    train_in_order: tf.data.Dataset  # training split, fixed order, batched: for measuring passes
    class_names: list[str]
    train_files: list[ImageFile]
    val_files: list[ImageFile]
    fingerprint: str
    cross_split_duplicates: int
    batch_size: int
    seed: int

    def training_batches(self, phase: int) -> tf.data.Dataset:
        """The training split reshuffled every epoch. Each phase starts its own shuffle sequence from the
        seed, so phase 2 sees the same orders whether phase 1 was trained or loaded from the cache."""
        return self.reshuffled(self.train_images, phase)

    def reshuffled(self, elements: tf.data.Dataset, phase: int) -> tf.data.Dataset:
        """``elements`` (one per training image, in the split's order) batched in the phase's shuffle
        orders: the order depends only on the seed, the phase and the count, never on the content, so
        anything aligned with the training split (e.g. its frozen-base features) is shuffled alike."""
        return (
            elements.shuffle(len(self.train_files), seed=self.seed + 1_000_003 * phase, reshuffle_each_iteration=True)
            .batch(self.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> dict[str, int]:
        """Images per class per split, as flat keys for MLflow params."""
        out: dict[str, int] = {}
        for split, files in (("train", self.train_files), ("val", self.val_files)):
            per_class = Counter(f.class_name for f in files)
            for name in self.class_names:
                out[f"{split}.{name}"] = per_class.get(name, 0)
            out[f"{split}.total"] = len(files)
        return out


_TF_INTERNALS = re.compile(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$")  # {{function_node ..}}, [Op:..]
_TF_CALL_FAILED = re.compile(r"^\w+::\w+ failed\.\s*")  # "jpeg::Uncompress failed." before the reason


def decode_failure_reason(message: str) -> str:
    """TensorFlow's decode error without its internals (``{{function_node ...}}``, ``[Op:DecodeImage]``)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    reason = _TF_CALL_FAILED.sub("", _TF_INTERNALS.sub("", first).strip())
    return reason.rstrip(".") or "TensorFlow cannot decode it"


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], bytes]]:
    """Hold back what C libraries print (libjpeg: "Improper call to JPEG library in state 201") while one
    image is decoded; the caller replays it when the image decodes, and drops it when it is named as
    corrupt (the error line says why)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:

        def captured() -> bytes:
            sink.seek(0)
            return sink.read()

        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _check_decodes(path: Path) -> tf.Tensor:
    """Decode with the op the pipeline uses, so a file that passes here cannot fail mid-training; the
    decoded image is returned, so the pipeline need not decode it again."""
    with _stderr_captured() as captured:
        try:
            image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
            failure = None
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
            failure = decode_failure_reason(exc.message)
        noise = captured()
    if failure is not None:
        raise UserError(f"corrupt image {path}: {failure}; delete or replace the file")
    if noise:
        os.write(2, noise)
    return image


def scan_folder(
    directory: str | None, decoded: Callable[[ImageFile, tf.Tensor], None] | None = None
) -> tuple[list[str], list[ImageFile]]:
    """Class names and every image (``image_files.list_images``), each checked to decode with the op the
    pipeline uses. ``decoded`` receives each file with its decoded pixels (to keep them: see
    ``DecodedImages``)."""
    class_names, files = list_images(directory)
    for file in files:
        pixels = _check_decodes(file.path)
        if decoded is not None:
            decoded(file, pixels)
    return class_names, files


def split_files(
    files: list[ImageFile], class_names: list[str], validation_split: float, seed: int
) -> tuple[list[ImageFile], list[ImageFile]]:
    """Keras's ``subset="both"`` split of the scanned files (``image_files.split_indices``). Equal to
    ``image_dataset_from_directory``'s split on any folder it can read (tested against it)."""
    train, val = split_indices([f.class_name for f in files], class_names, validation_split, seed)
    return [files[i] for i in train], [files[i] for i in val]


def _resized(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Keras's directory loader's resize (bilinear), float32 pixels in [0, 255]."""
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    image.set_shape((image_size, image_size, 3))
    return image


def _load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Exactly Keras's directory loader: decode, then resize."""
    return _resized(tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False), image_size)


class DecodedImages:
    """The resized pixels of every scanned image, kept from the scan's decode while they fit in
    ``budget`` bytes (a small folder, such as the course's 327 images, is then decoded once). Past the
    budget it keeps nothing, and the pipeline reads the files itself."""

    def __init__(self, image_size: int, budget: int):
        self.image_size = image_size
        self.budget = budget
        self.pixels: dict[Path, tf.Tensor] | None = {}
        self._bytes = 0

    def __call__(self, file: ImageFile, image: tf.Tensor) -> None:
        if self.pixels is None:
            return
        self._bytes += self.image_size**2 * 3 * 4
        if self._bytes > self.budget:
            self.pixels = None  # too many to hold: stream from the files
            return
        self.pixels[file.path] = _resized(image, self.image_size)


IN_MEMORY_BYTES = 1 << 30  # resized float32 pixels kept from the scan: ~1,780 images at 224 px, ~3,500 at 160


def _images(files: list[ImageFile], class_names: list[str], cfg: DataConfig, decoded: DecodedImages) -> tf.data.Dataset:
    binary = len(class_names) == 2
    labels = [class_names.index(f.class_name) for f in files]
    label_dtype = tf.float32 if binary else tf.int32
    labels_t = tf.constant(labels, dtype=label_dtype)
    if binary:
        labels_t = tf.reshape(labels_t, (-1, 1))
    if decoded.pixels is not None:  # decoded once, by the scan
        return tf.data.Dataset.from_tensor_slices((tf.stack([decoded.pixels[f.path] for f in files]), labels_t))
    # too large to hold: stream, reading and decoding the files every epoch, so memory stays bounded by
    # the pipeline's buffers whatever the folder's size (docs/your-data.md, "Large folders")
    paths = tf.data.Dataset.from_tensor_slices([str(f.path) for f in files])
    images = paths.map(lambda p: _load_image(p, cfg.image_size), num_parallel_calls=tf.data.AUTOTUNE)
    return tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(labels_t)))


def load_datasets(cfg: DataConfig) -> Datasets:
    """Check the folder, split it the Keras way, and build the pipelines: from the scan's decoded pixels
    while they fit in ``IN_MEMORY_BYTES``, else streamed from the files."""
    if cfg.synthetic:
        from ..demo_data import ensure_demo_dataset

        ensure_demo_dataset(cfg.dir, cfg.synthetic_images_per_class)
    decoded = DecodedImages(cfg.image_size, IN_MEMORY_BYTES)
    class_names, files = scan_folder(cfg.dir, decoded)
    train_files, val_files = split_files(files, class_names, cfg.validation_split, cfg.seed)

    train_cached = _images(train_files, class_names, cfg, decoded)
    val_cached = _images(val_files, class_names, cfg, decoded)
    decoded.pixels = None  # the datasets hold their own copies
    val = val_cached.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)
    train_in_order = train_cached.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)

    train_hashes = {f.sha256 for f in train_files}
    duplicates = sum(1 for f in val_files if f.sha256 in train_hashes)
    return Datasets(
        train_images=train_cached,
        val=val,
        train_in_order=train_in_order,
        class_names=class_names,
        train_files=train_files,
        val_files=val_files,
        fingerprint=fingerprint(files),
        cross_split_duplicates=duplicates,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )

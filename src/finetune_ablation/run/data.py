"""The user's image folder as train/validation datasets, checked before any training starts.

Which files count is decided once, in ``image_files`` (no TensorFlow: resume fingerprints a folder with
it before a job knows whether it trains): the scan, the fingerprint and the split all read that list.
The split is Keras's own assignment (``image_dataset_from_directory`` with ``subset="both"`` and the
seed: by file, disjoint), computed on that list rather than by a second walk of the folder that would
see files the scan skipped. Images are decoded with the same ops Keras uses, once, by the scan that checks
them; their pixels are kept in memory or, past ``cache.pixels_memory_mib``, in a scratch file on local disk
(``kept_rows``; neither fitting, the files are decoded again at every read). The training split is
reshuffled every epoch from its seed, as positions whose rows each batch gathers; a second, unshuffled view
of it serves the measuring passes, so measuring never advances the training pipeline's shuffle state."""

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

import numpy as np
import tensorflow as tf

from ..config import DataConfig
from ..errors import UserError
from .image_files import ImageFile, fingerprint, list_images, split_indices
from .kept_rows import KeptRows, Placement, Storage, announce, place, why


@dataclass
class Split:
    """One split in its fixed order: its files, their labels, and their pixels read by position (kept
    rows, or the files decoded at every read: ``Pixels``)."""

    files: list[ImageFile]
    labels: np.ndarray  # (n, 1) float32 for two classes, (n,) int32 for more
    pixels: Pixels
    rows: np.ndarray  # each image's row in ``pixels`` (the scan's order)
    batch_size: int

    def batches(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        """(pixels, labels) per batch of positions in the split (``indices`` yields int64 vectors)."""
        rows, labels = tf.constant(self.rows), tf.constant(self.labels)
        return self.pixels.batches(indices.map(lambda i: (tf.gather(rows, i), tf.gather(labels, i))), self.batch_size)

    def positions(self) -> tf.data.Dataset:
        """Positions in the split in its fixed order, batched."""
        return tf.data.Dataset.range(len(self.files)).batch(self.batch_size)

    def in_order(self) -> tf.data.Dataset:
        """The split in its fixed order, batched."""
        return self.batches(self.positions())


@dataclass
class Datasets:
    train: Split
    validation: Split
    class_names: list[str]
    fingerprint: str
    cross_split_duplicates: int
    batch_size: int
    seed: int
    pixels: Placement  # where the decoded pixels are kept (the ``storage.decoded_pixels`` tag)

    @property
    def train_files(self) -> list[ImageFile]:
        return self.train.files

    @property
    def val_files(self) -> list[ImageFile]:
        return self.validation.files

    @property
    def val(self) -> tf.data.Dataset:
        """Validation in its fixed order, batched."""
        return self.validation.in_order().prefetch(tf.data.AUTOTUNE)

    @property
    def train_in_order(self) -> tf.data.Dataset:
        """The training split in its fixed order, batched: for measuring passes, so measuring never
        advances the training pipeline's shuffle state."""
        return self.train.in_order().prefetch(tf.data.AUTOTUNE)

    def index_batches(self, phase: int) -> tf.data.Dataset:
        """Positions in the training split, reshuffled every epoch and batched. Each phase starts its own
        shuffle sequence from the seed, so phase 2 sees the same orders whether phase 1 was trained or
        loaded from the cache. The order depends only on the seed, the phase and the count: anything
        aligned with the training split (e.g. its frozen-base features) is read in these orders alike.
        It is the permutation ``shuffle`` with a buffer of the whole split gives the rows themselves
        (tested), without holding them in a shuffle buffer."""
        n = len(self.train.files)
        return (
            tf.data.Dataset.range(n)
            .shuffle(n, seed=self.seed + 1_000_003 * phase, reshuffle_each_iteration=True)
            .batch(self.batch_size)
        )

    def training_batches(self, phase: int) -> tf.data.Dataset:
        """The training split reshuffled every epoch (``index_batches``), as (pixels, labels) batches."""
        return self.train.batches(self.index_batches(phase)).prefetch(tf.data.AUTOTUNE)

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


def scan_folder(directory: str | None) -> tuple[list[str], list[ImageFile]]:
    """Class names and every image (``image_files.list_images``), each checked to decode with the op the
    pipeline uses, keeping nothing: a folder's check without a run (the tests use it; ``load_datasets``
    makes the same check in ``Pixels.scan``, keeping the pixels)."""
    class_names, files = list_images(directory)
    for file in files:
        _check_decodes(file.path)
    return class_names, files


def _resized(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Keras's directory loader's resize (bilinear), float32 pixels in [0, 255]."""
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    image.set_shape((image_size, image_size, 3))
    return image


def _load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Exactly Keras's directory loader: decode, then resize."""
    return _resized(tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False), image_size)


class Pixels:
    """Every scanned image's resized pixels by row (the scan's order): kept from the scan's own decode
    (in memory or in a scratch file: ``kept_rows``), or, when neither fits, decoded from the files again
    at every read. The same decode and resize either way, so the same pixels, bit for bit."""

    def __init__(self, files: list[ImageFile], image_size: int, placement: Placement, kept: KeptRows | None):
        self.paths = [str(f.path) for f in files]
        self.image_size = image_size
        self.placement = placement
        self.kept = kept

    @classmethod
    def scan(cls, files: list[ImageFile], image_size: int, storage: Storage) -> Pixels:
        """Check that every file decodes (with the op the pipeline uses) and keep its resized pixels where
        ``kept_rows.place`` decides. A scratch file that cannot be reserved or written (a full disk) falls
        back to decoding at every read, with a warning."""
        nbytes = len(files) * image_size**2 * 3 * 4
        placement = place(nbytes, storage.pixels_memory_bytes, PIXELS_BUDGET_KEY, storage)
        kept = None
        if placement.where != "recomputed":
            try:
                kept = KeptRows([(image_size, image_size, 3)], len(files), placement.where, storage.scratch_dir)
            except OSError as exc:
                placement = placement.fell_back(WHAT, f"their scratch file could not be reserved ({why(exc)})")
        for row, file in enumerate(files):
            image = _check_decodes(file.path)
            if kept is None:
                continue
            try:
                kept.write(row, [_resized(image, image_size).numpy()[None]])
            except OSError as exc:
                kept.close()
                kept = None
                placement = placement.fell_back(WHAT, f"writing their scratch file failed ({why(exc)})")
        announce(WHAT, placement)
        return cls(files, image_size, placement, kept)

    def batches(self, rows_and_labels: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        """(pixels, labels) for each batch of (rows, labels)."""
        if self.kept is not None:
            kept = self.kept
            return rows_and_labels.map(lambda rows, y: (kept.gather(rows)[0], y))
        # decoded at every read, image by image on tf.data's parallel threads, batched again as they came
        # (the batch count stays known: Keras reads validation to its end without a warning then)
        paths, size, batches = tf.constant(self.paths), self.image_size, int(rows_and_labels.cardinality())
        images = rows_and_labels.unbatch().map(
            lambda row, y: (_load_image(tf.gather(paths, row), size), y),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        images = images.batch(batch_size)
        return images.apply(tf.data.experimental.assert_cardinality(batches)) if batches >= 0 else images


PIXELS_BUDGET_KEY = "cache.pixels_memory_mib"
WHAT = "decoded pixels"


def _labels(files: list[ImageFile], class_names: list[str]) -> np.ndarray:
    """Class indices: float32 of shape (n, 1) for two classes (one logit), int32 (n,) for more."""
    labels = np.array([class_names.index(f.class_name) for f in files])
    return labels.astype(np.float32).reshape(-1, 1) if len(class_names) == 2 else labels.astype(np.int32)


def load_datasets(cfg: DataConfig, storage: Storage | None = None) -> Datasets:
    """Check the folder, split it the Keras way, and build the pipelines over the pixels the scan kept
    (``Pixels``; where they are kept: ``storage``, the ``cache`` keys, defaults if None)."""
    if cfg.synthetic:
        from ..demo_data import ensure_demo_dataset

        ensure_demo_dataset(cfg.dir, cfg.synthetic_images_per_class)
    class_names, files = list_images(cfg.dir)
    pixels = Pixels.scan(files, cfg.image_size, storage or Storage.from_config())
    train_rows, val_rows = split_indices([f.class_name for f in files], class_names, cfg.validation_split, cfg.seed)

    def split(rows: list[int]) -> Split:
        chosen = [files[i] for i in rows]
        return Split(chosen, _labels(chosen, class_names), pixels, np.array(rows, np.int64), cfg.batch_size)

    train, validation = split(train_rows), split(val_rows)
    train_hashes = {f.sha256 for f in train.files}
    duplicates = sum(1 for f in validation.files if f.sha256 in train_hashes)
    return Datasets(
        train=train,
        validation=validation,
        class_names=class_names,
        fingerprint=fingerprint(files),
        cross_split_duplicates=duplicates,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        pixels=pixels.placement,
    )

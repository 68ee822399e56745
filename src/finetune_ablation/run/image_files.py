"""Which files of an image folder are the data, and their fingerprint, without TensorFlow.

The one rule for what counts (``is_ignored``, ``IMAGE_SUFFIXES``) and the order Keras's directory loader
indexes files in. ``data.load_datasets`` lists with it and then decodes each image once (``Pixels.scan``,
which refuses one that does not decode and keeps the pixels); resume
fingerprints a folder with it alone, before a job knows whether it trains (a job that is skipped never
imports TensorFlow); ``ablate`` checks the folder's shape and its seeded split with it before it loads
TensorFlow."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fingerprints import file_sha256

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what Keras's directory loader reads
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class ImageFile:
    path: Path
    relpath: str
    class_name: str
    sha256: str


def is_ignored(name: str) -> bool:
    """The one rule for what is not data, for class folders, sub-folders and files alike: hidden files and folders
    (``.DS_Store``, macOS's ``._img.jpg`` resource forks, ``.ipynb_checkpoints``) and Windows' clutter."""
    return name.startswith(".") or name.lower() in _IGNORED_FILES


def _class_files(root: Path, name: str) -> list[Path]:
    """A class folder's images in Keras's index order (``index_directory``): folders sorted by path,
    files sorted by name; hidden files and folders are not walked."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(root / name):
        dirnames[:] = [d for d in dirnames if not is_ignored(d)]
        walked.append((dirpath, filenames))
    return [Path(dirpath) / f for dirpath, names in sorted(walked) for f in sorted(names) if not is_ignored(f)]


def class_folders(directory: str | None) -> tuple[Path, list[str], dict[str, list[Path]]]:
    """The folder, its class names (sorted visible sub-folders) and each class's images in Keras's index
    order, from the names alone: no file is opened, so ``ablate`` refuses a folder that is missing, has
    fewer than two classes, an empty class or a file of another type before it loads TensorFlow."""
    if not directory:
        raise UserError(
            "data.dir is not set: pass data.dir=PATH (a folder with one sub-folder per class), or try experiment=demo"
        )
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(
            f"data.dir={directory} does not exist or is not a folder: pass data.dir=PATH to a folder "
            "with one sub-folder per class"
        )
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_ignored(p.name))
    if len(class_names) < 2:
        raise UserError(
            f"data.dir={directory} has {len(class_names)} class folder(s) {class_names}: a classifier "
            "needs at least two, one sub-folder per class"
        )
    paths = {name: _class_files(root, name) for name in class_names}
    for name, found in paths.items():
        if not found:
            raise UserError(f"class folder {root / name} has no images: add images or remove the empty folder")
        for path in found:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(
                    f"{path} is not an image Keras can read (allowed: {', '.join(IMAGE_SUFFIXES)}): "
                    "move it out of the data folder or convert it"
                )
    return root, class_names, paths


def split_indices(
    labels: Sequence[str], class_names: list[str], validation_split: float, seed: int
) -> tuple[list[int], list[int]]:
    """Keras's ``subset="both"`` split of files labelled ``labels`` (in index order): one
    ``RandomState(seed)`` shuffle of the whole index, the last ``int(validation_split * n)`` validate.
    Refuses, with the real reason, a split that leaves a split or a class without images. Labels are all
    it needs, so ``ablate`` checks the split before it opens a file."""
    order = list(range(len(labels)))
    np.random.RandomState(seed).shuffle(order)
    n_val = int(validation_split * len(labels))
    if n_val == 0:
        needed = next(n for n in range(1, 10**6) if int(validation_split * n) >= 1)
        raise UserError(
            f"data.validation_split={validation_split} of {len(labels)} images is "
            f"{validation_split * len(labels):.2g}, which rounds down to 0 validation images: add images "
            f"(at least {needed} in all) or raise data.validation_split"
        )
    train, val = order[: len(labels) - n_val], order[len(labels) - n_val :]
    for split, chosen in (("validation", val), ("training", train)):
        present = {labels[i] for i in chosen}
        for name in class_names:
            if name not in present:
                raise UserError(
                    f"class {name} has none of its {labels.count(name)} images in the {split} split "
                    f"(data.validation_split={validation_split}, data.seed={seed}), so {split} would never "
                    f"see it: add images to {name}, or change data.validation_split"
                )
    return train, val


def check_folder(directory: str | None, validation_split: float, seed: int) -> None:
    """Everything the names alone show to be wrong with a data folder: its shape (``class_folders``) and
    its seeded split (``split_indices``). ``ablate`` runs it before it imports TensorFlow."""
    _, class_names, paths = class_folders(directory)
    split_indices([name for name in class_names for _ in paths[name]], class_names, validation_split, seed)


def list_images(directory: str | None) -> tuple[list[str], list[ImageFile]]:
    """Class names and every image with its SHA-256, in the order Keras's directory loader indexes them
    (so the seeded split assigns each file as Keras would). Refuses what ``class_folders`` refuses, and a
    file that cannot be read. Whether each image decodes is ``data.Pixels.scan``'s check."""
    root, class_names, paths = class_folders(directory)
    files = [
        ImageFile(path, path.relative_to(root).as_posix(), name, _readable_sha256(path))
        for name in class_names
        for path in paths[name]
    ]
    return class_names, files


def _readable_sha256(path: Path) -> str:
    """The file's SHA-256, or the one line that says it cannot be read (a broken link, no permission)."""
    try:
        return file_sha256(path)
    except OSError as exc:
        raise UserError(
            f"{path} cannot be read ({exc.strerror or exc}): fix its permissions, or remove it from the data "
            "folder (a link whose target is gone?)"
        ) from None


def fingerprint(files: list[ImageFile]) -> str:
    """Hash over sorted relative paths and file contents: names the exact data a run saw."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        digest.update(f"{f.relpath}\0{f.sha256}\n".encode())
    return digest.hexdigest()

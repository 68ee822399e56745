"""The training and validation splits as MLflow datasets (``mlflow.log_input``), so the runs table's Dataset
column and the run's page name the data, and the UI can group runs by it (docs/run-record.md, "Datasets").

Each split is described, never copied or read again: its name is the data folder's, its source the folder,
its digest the suite's fingerprint of the split's own files (``image_files.fingerprint``: paths and
contents, from the hashes the scan computed), its profile the images per class. A split's digest differs
from the other split's and from the same folder split with another ``data.seed``, so MLflow, which keys a
dataset by name and digest, keeps them apart."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import record as rec
from .image_files import ImageFile, fingerprint


@dataclass(frozen=True)
class SplitDataset:
    """What the run record says about one split (no MLflow object: the Recorder makes one)."""

    context: str  # MLflow's mlflow.data.context: training | validation
    name: str  # the data folder's name
    source: str  # the data folder, absolute
    digest: str  # the split's fingerprint, cut to record.DATASET_DIGEST_LENGTH
    class_counts: dict[str, int]
    image_size: int

    @property
    def profile(self) -> dict[str, Any]:
        return {"images": sum(self.class_counts.values()), "images_per_class": self.class_counts}


def split_datasets(
    folder: str, class_names: list[str], splits: dict[str, list[ImageFile]], image_size: int
) -> list[SplitDataset]:
    """One ``SplitDataset`` per split (``{"train": files, "val": files}``), in that order."""
    source = str(Path(folder).expanduser().resolve())
    out = []
    for split, files in splits.items():
        per_class = Counter(f.class_name for f in files)
        out.append(
            SplitDataset(
                context=rec.DATASET_CONTEXTS[split],
                name=Path(source).name,
                source=source,
                digest=fingerprint(files)[: rec.DATASET_DIGEST_LENGTH],
                class_counts={name: per_class.get(name, 0) for name in class_names},
                image_size=image_size,
            )
        )
    return out


def log_split_datasets(splits: list[SplitDataset]) -> None:
    """``mlflow.log_inputs`` of the splits into the active run, each with its context."""
    import mlflow
    import numpy as np
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types.schema import Schema, TensorSpec

    class ImageFolderSplit(MetaDataset):
        """A MetaDataset (name, source, digest: no data) that also carries the images per class."""

        def __init__(self, split: SplitDataset):
            shape = (-1, split.image_size, split.image_size, 3)
            self._split = split
            self._tensors = TensorDatasetSchema(
                features=Schema([TensorSpec(np.dtype("float32"), shape, "image")]),
                targets=Schema([TensorSpec(np.dtype("int32"), (-1,), "label")]),
            )
            # MLflow's "local" source: a folder on the machine that ran (by type, not guessed from the path)
            source = get_dataset_source_from_json(json.dumps({"uri": split.source}), source_type="local")
            super().__init__(source, name=split.name, digest=split.digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._split.profile

        @property
        def schema(self) -> TensorDatasetSchema:
            return self._tensors

        def to_dict(self) -> dict[str, str]:
            config = super(MetaDataset, self).to_dict()  # name, digest, source, source type
            config["schema"] = json.dumps(self._tensors.to_dict())
            config["profile"] = json.dumps(self.profile)
            return config

    for split in splits:
        mlflow.log_input(ImageFolderSplit(split), context=split.context)

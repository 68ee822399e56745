"""Reading the user's training (and validation) data without changing what ``fit`` reads.

A seeded ``shuffle`` that reshuffles every pass (``image_dataset_from_directory``'s default) keeps its
position in a generator TensorFlow shares by seed: one more pass over the dataset, or over a copy of it,
moves the order of every later epoch (measured: docs/notebook.md). So a dataset with a shuffle is read
through a copy of its pipeline with every shuffle taken out: the same elements, in their order before
shuffling, and no shared state touched. A pipeline TensorFlow cannot copy (it holds Python functions or
other external state) is read as it is, and the callback says so."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class DataError(ValueError):
    """The data cannot be read as a split; the message says the fix."""


def _has_shuffle(dataset: tf.data.Dataset) -> bool:
    if "Shuffle" in type(dataset).__name__:
        return True
    return any(_has_shuffle(d) for d in dataset._inputs())


def unshuffled_copy(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The same pipeline with its shuffle steps removed, rebuilt from its graph (a new pipeline: it shares
    no iterator or seed state with ``dataset``). Raises ``tf.errors.OpError``/``ValueError`` when the
    pipeline holds state TensorFlow cannot copy."""
    from tensorflow.python.data.ops import dataset_ops
    from tensorflow.python.ops import gen_experimental_dataset_ops

    serialized = dataset._as_serialized_graph(external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL)
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(serialized.numpy())
    shuffles = {node.name: node.input[0] for node in graph.node if node.op.startswith("Shuffle")}
    kept = [node for node in graph.node if node.name not in shuffles]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in shuffles:
                name = shuffles[name]
            node.input[i] = name
    del graph.node[:]
    graph.node.extend(kept)
    variant = gen_experimental_dataset_ops.dataset_from_graph(graph.SerializeToString())
    return dataset_ops._VariantDataset(variant, dataset.element_spec)


def as_split(data, batch_size: int = 32, what: str = "train_data") -> tuple[tf.data.Dataset, str | None]:
    """``data`` as a dataset of (inputs, labels) batches that reading does not disturb, and a note to
    print once, if any. ``data``: a ``tf.data.Dataset`` of batches (inputs, labels[, weights]), or a
    tuple (inputs, labels) of arrays."""
    note = None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return tf.data.Dataset.from_tensor_slices(tuple(data)).batch(batch_size), None
    if not isinstance(data, tf.data.Dataset):
        raise DataError(f"{what} must be a tf.data.Dataset of (inputs, labels) batches or a tuple (x, y) of arrays")
    if data.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise DataError(f"{what} repeats forever: pass the split once (without .repeat())")
    spec = data.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise DataError(f"{what} must yield (inputs, labels) batches, not {spec}")
    if len(spec) == 3:
        note = f"{what} has sample weights: the measured conditions leave them out"
        data = data.map(lambda x, y, w: (x, y))
    if _has_shuffle(data):
        try:
            data = unshuffled_copy(data)
        except (tf.errors.OpError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:120]
            note = (
                f"{what}'s pipeline cannot be copied ({reason}): reading it moves its shuffle order, so "
                "training differs from a run without the callback; pass an unshuffled dataset to keep it"
            )
    return data, note


def class_indices(labels: np.ndarray) -> np.ndarray:
    """Class of each label: a 0/1 column, an integer, or a one-hot row."""
    labels = np.asarray(labels)
    if labels.ndim >= 2 and labels.shape[-1] > 1:
        return labels.argmax(axis=-1)
    return np.rint(labels.reshape(len(labels), -1)[:, 0]).astype(int)


def split_labels(dataset: tf.data.Dataset) -> np.ndarray:
    """Every example's class, in order (one pass over the labels)."""
    return np.concatenate([class_indices(y.numpy()) for _, y in dataset])

"""Data split, fingerprint, the logits threshold, and base loading (local weights file, offline hint)."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from finetune_ablation.config import DataConfig, ModelConfig
from finetune_ablation.data import load_datasets, scan_folder
from finetune_ablation.errors import UserError
from finetune_ablation.model import load_base
from finetune_ablation.train import loss_and_accuracy


def _data_cfg(directory, **kw) -> DataConfig:
    return DataConfig(dir=str(directory), image_size=32, batch_size=8, validation_split=0.25, **kw)


def test_split_is_disjoint_complete_and_seeded(image_dir):
    data = load_datasets(_data_cfg(image_dir))
    train = {f.relpath for f in data.train_files}
    val = {f.relpath for f in data.val_files}
    assert not train & val
    assert len(train | val) == 40 and len(val) == 10
    assert load_datasets(_data_cfg(image_dir)).val_files == data.val_files
    assert {f.relpath for f in load_datasets(_data_cfg(image_dir, seed=7)).val_files} != val
    counts = data.counts()
    assert counts["train.total"] == 30 and counts["val.alpaca"] + counts["val.not_alpaca"] == 10


def test_training_split_reshuffles_but_measuring_view_does_not(image_dir):
    data = load_datasets(_data_cfg(image_dir))

    def image_sums(dataset) -> list[float]:
        return [float(s) for x, _ in dataset for s in x.numpy().sum(axis=(1, 2, 3))]

    batches = data.training_batches(phase=1)
    first, second = image_sums(batches), image_sums(batches)
    assert sorted(first) == sorted(second) and first != second  # same images, new order each epoch
    assert image_sums(data.training_batches(phase=1)) == first  # a phase's orders follow from the seed
    assert image_sums(data.training_batches(phase=2)) != first
    assert image_sums(data.train_in_order) == image_sums(data.train_in_order)


def test_cross_split_duplicates_are_counted(own_image_dir):
    data = load_datasets(_data_cfg(own_image_dir))
    val_file = data.val_files[0]
    for i in range(3):  # copies of one validation image, some of which land in training
        shutil.copy(val_file.path, val_file.path.with_name(f"copy_{i}.png"))
    data = load_datasets(_data_cfg(own_image_dir))
    assert data.cross_split_duplicates >= 1


def test_fingerprint_changes_with_content_not_with_scan_order(own_image_dir):
    _, files = scan_folder(str(own_image_dir))
    from finetune_ablation.data import fingerprint

    before = fingerprint(files)
    assert fingerprint(list(reversed(files))) == before
    target = own_image_dir / "alpaca" / files[0].path.name
    target.write_bytes(target.read_bytes() + b"\0")
    assert fingerprint(scan_folder(str(own_image_dir))[1]) != before


def test_logit_accuracy_thresholds_at_zero():
    """A logit of 0.3 is class 1 (p=0.57); Keras's default 'accuracy' would call it class 0 (FACTS)."""
    _, accuracy = loss_and_accuracy(binary=True)
    labels = np.array([[1.0], [0.0], [1.0], [0.0]])
    logits = np.array([[0.3], [-0.3], [2.0], [-0.2]])
    accuracy.update_state(labels, logits)
    assert float(accuracy.result()) == 1.0
    naive = keras.metrics.BinaryAccuracy()  # what metrics=["accuracy"] becomes: threshold 0.5
    naive.update_state(labels, logits)
    assert float(naive.result()) == 0.75


def _model_cfg(**kw) -> ModelConfig:
    return OmegaConf.structured(ModelConfig(**kw))


def test_local_weights_file_is_loaded(tmp_path):
    keras.utils.set_random_seed(3)
    source = load_base(_model_cfg(weights=None), 32)
    path = tmp_path / "base.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(4)
    loaded = load_base(_model_cfg(weights=str(path)), 32)
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="is not a file: use imagenet, null"):
        load_base(_model_cfg(weights=str(tmp_path / "nope.weights.h5")), 32)


def test_failed_imagenet_download_names_the_offline_options(tmp_path, monkeypatch):
    """Force the download to fail locally (a proxy on a closed loopback port): no traffic leaves."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(UserError, match=r"model.weights=null .* model.weights=/path/to/file.weights.h5"):
        load_base(_model_cfg(weights="imagenet"), 96)


def test_unknown_base_module_is_refused():
    with pytest.raises(UserError, match=r"not a keras\.applications module"):
        load_base(_model_cfg(name="os"), 32)
    with pytest.raises(UserError, match="not a constructor"):
        load_base(_model_cfg(architecture="preprocess_input"), 32)


def test_fine_tune_at_accepts_index_name_and_beyond_the_end():
    from finetune_ablation.model import freeze_base, resolve_fine_tune_at, unfreeze_top

    base = load_base(_model_cfg(weights=None), 32)
    assert len(base.layers) == 154  # Keras 3 MobileNetV2 (tf.keras 2 had 155)
    assert resolve_fine_tune_at(base, "block_16_expand") == [layer.name for layer in base.layers].index(
        "block_16_expand"
    )
    freeze_base(base)
    assert unfreeze_top(base, resolve_fine_tune_at(base, 500), freeze_bn=False) is None
    assert base.trainable_weights == []  # nothing unfrozen: phase 2 is plain extra epochs
    assert unfreeze_top(base, 0, freeze_bn=True) == base.layers[0].name
    assert base.trainable_weights and all(
        "gamma" not in w.path and "beta" not in w.path for w in base.trainable_weights
    )

"""Data split, fingerprint, the logits threshold, and base loading (local weights file, offline hint)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from finetune_ablation.config import DataConfig, ModelConfig
from finetune_ablation.errors import UserError
from finetune_ablation.run import resume
from finetune_ablation.run.data import decode_failure_reason, load_datasets, scan_folder
from finetune_ablation.run.model import compile_for_fit, load_base
from finetune_ablation.run.train import fit_epochs, loss_and_accuracy

from .helpers import keras_split


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


def _paths(files) -> list[str]:
    return [str(f.path) for f in files]


def test_split_is_keras_own_assignment_file_for_file(own_image_dir):
    """Same files, same order, same side as ``image_dataset_from_directory(subset="both")``, nested
    folders included (Keras orders them by path: ``sub-2`` before ``sub/deeper``)."""
    image = own_image_dir / "alpaca" / "alpaca_000.png"
    for sub in ("sub", "sub-2", "sub/deeper"):
        (own_image_dir / "alpaca" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, own_image_dir / "alpaca" / sub / "z.png")
    for seed in (42, 7):
        data = load_datasets(_data_cfg(own_image_dir, seed=seed))
        assert (_paths(data.train_files), _paths(data.val_files)) == keras_split(own_image_dir, seed, 0.25)
        assert len(data.train_files) + len(data.val_files) == 43


def test_os_clutter_counts_nowhere_and_leaves_the_split_unchanged(own_image_dir, tmp_path):
    """macOS ``._x.jpg`` resource forks, ``.DS_Store``, hidden folders (inside a class too) and Windows'
    ``Thumbs.db`` are not data: the folder loads (Keras's own loader dies on ``._x.jpg``), and every
    file lands on the side Keras puts it in the same folder without the clutter."""
    clean = tmp_path / "clean"
    shutil.copytree(own_image_dir, clean)
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)
    (own_image_dir / "alpaca" / "._alpaca_000.jpg").write_bytes(apple_double)
    (own_image_dir / "not_alpaca" / "._x.png").write_bytes(apple_double)
    (own_image_dir / "alpaca" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (own_image_dir / "alpaca" / "Thumbs.db").write_bytes(b"\0junk")
    for hidden in (own_image_dir / ".ipynb_checkpoints", own_image_dir / "alpaca" / ".ipynb_checkpoints"):
        hidden.mkdir()
        shutil.copy(own_image_dir / "alpaca" / "alpaca_001.png", hidden / "alpaca_001-checkpoint.png")
    with pytest.raises(Exception):  # noqa: B017  what users hit before: Keras indexes ._alpaca_000.jpg
        train, val = keras.utils.image_dataset_from_directory(
            str(own_image_dir), validation_split=0.25, subset="both", seed=42, batch_size=None, image_size=(32, 32)
        )
        for _ in train.concatenate(val):
            pass
    data = load_datasets(_data_cfg(own_image_dir))
    assert data.class_names == ["alpaca", "not_alpaca"]
    relpaths = {f.relpath for f in data.train_files + data.val_files}
    assert len(relpaths) == 40 and not any("/." in "/" + r or "Thumbs" in r for r in relpaths)
    keras_train, keras_val = keras_split(clean, 42, 0.25)
    assert [f.relpath for f in data.train_files] == [str(Path(p).relative_to(clean)) for p in keras_train]
    assert [f.relpath for f in data.val_files] == [str(Path(p).relative_to(clean)) for p in keras_val]
    assert data.fingerprint == load_datasets(_data_cfg(clean)).fingerprint
    # by hand, from Keras's own file list of the clean folder: what training logs, and what resume compares
    # (resume lists the folder without TensorFlow, before a job knows whether it trains)
    by_hand = hashlib.sha256()
    for rel in sorted(str(Path(p).relative_to(clean)) for p in keras_train + keras_val):
        by_hand.update(f"{rel}\0{hashlib.sha256((clean / rel).read_bytes()).hexdigest()}\n".encode())
    assert data.fingerprint == by_hand.hexdigest()
    assert resume.data_fingerprint(OmegaConf.create({"data": {"dir": str(own_image_dir), "synthetic": False}})) == (
        by_hand.hexdigest()
    )


def test_corrupt_image_reason_has_no_tensorflow_internals():
    tf_message = (
        "{{function_node __wrapped__DecodeImage_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
        "jpeg::Uncompress failed. Invalid JPEG data or crop window. [Op:DecodeImage] name: "
    )
    assert decode_failure_reason(tf_message) == "Invalid JPEG data or crop window"
    assert decode_failure_reason("{{function_node x}} Input is empty. [Op:DecodeImage]") == "Input is empty"


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


def test_each_epoch_trains_on_the_next_reshuffle(image_dir):
    """Epoch k of a phase trains on the k-th pass over the phase's batches. Plain ``fit`` trains on passes
    1, 3, 5: it makes and discards an iterator at each epoch's end (docs/stack-facts.md K10)."""
    import tensorflow as tf

    data = load_datasets(_data_cfg(image_dir))
    steps = -(-len(data.train_files) // data.batch_size)

    def sums(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(x, axis=(1, 2, 3))

    keras.utils.set_random_seed(0)  # the shuffle's seed depends on the global one, as in a run
    batches = data.training_batches(phase=1)
    passes = [[float(s) for x, _ in batches for s in sums(x).numpy()] for _ in range(5)]  # read independently

    trained: list[float] = []
    keras.utils.set_random_seed(0)
    noted = data.training_batches(phase=1).map(
        lambda x, y: (tf.py_function(lambda s: trained.extend(s.numpy().tolist()) or s, [sums(x)], tf.float32), y)
    )
    noted = noted.map(lambda s, y: (tf.reshape(s, (-1, 1)), y))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    fit_epochs(model, noted, steps, None, first_epoch=2, epochs=3, callbacks=[], verbose=0)
    per_epoch = [trained[i * len(data.train_files) : (i + 1) * len(data.train_files)] for i in range(3)]
    assert [passes.index(epoch) + 1 for epoch in per_epoch] == [1, 2, 3]


def test_compile_for_fit_traces_the_train_step_once():
    """Left to ``fit``, Adam makes its variables inside the train step's first trace, and TensorFlow traces
    the step again; built at compile time, one trace, the same losses (docs/stack-facts.md K11)."""
    x = np.linspace(-1, 1, 32, dtype="float32").reshape(-1, 1)
    y = x**2

    def fitted(compile_it) -> tuple[int, list[float]]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, "tanh"), keras.layers.Dense(1)])
        compile_it(model, keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError(), [])
        traces = []
        step = model.train_step  # runs in Python only while the step is traced
        model.train_step = lambda data: traces.append(data) or step(data)
        losses = model.fit(x, y, batch_size=8, epochs=3, verbose=0).history["loss"]
        return len(traces), losses

    def plain_compile(model: keras.Model, optimizer, loss, metrics: list) -> None:
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics)

    plain = fitted(plain_compile)
    built = fitted(compile_for_fit)
    assert (plain[0], built[0]) == (2, 1)
    assert built[1] == plain[1]


def test_cross_split_duplicates_are_counted(own_image_dir):
    data = load_datasets(_data_cfg(own_image_dir))
    val_file = data.val_files[0]
    for i in range(3):  # copies of one validation image, some of which land in training
        shutil.copy(val_file.path, val_file.path.with_name(f"copy_{i}.png"))
    data = load_datasets(_data_cfg(own_image_dir))
    assert data.cross_split_duplicates >= 1


def test_fingerprint_changes_with_content_not_with_scan_order(own_image_dir):
    _, files = scan_folder(str(own_image_dir))
    from finetune_ablation.run.data import fingerprint

    before = fingerprint(files)
    assert fingerprint(list(reversed(files))) == before
    target = own_image_dir / "alpaca" / files[0].path.name
    target.write_bytes(target.read_bytes() + b"\0")
    assert fingerprint(scan_folder(str(own_image_dir))[1]) != before


def test_logit_accuracy_thresholds_at_zero():
    """A logit of 0.3 is class 1 (p=0.57); Keras's default 'accuracy' would call it class 0 (docs/stack-facts.md K5)."""
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
    from finetune_ablation.run.model import freeze_base, resolve_fine_tune_at, unfreeze_top

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


# Where the decoded pixels are kept (cache keys): in memory, in a scratch file (over a budget of 0), or
# decoded from the files at every read (the scratch disk would keep less than 10^8 MiB free)
PLACEMENTS = {
    "memory": {},
    "disk": {"pixels_memory_mib": 0},
    "recomputed": {"pixels_memory_mib": 0, "scratch_keep_free_mib": 10**8},
}


def _storage(where: str):
    from finetune_ablation.config import CacheConfig
    from finetune_ablation.run.kept_rows import Storage

    return Storage.from_config(CacheConfig(**PLACEMENTS[where]))


@pytest.mark.parametrize("where", PLACEMENTS)
def test_pipeline_pixels_equal_an_independent_decoder(image_dir, where):
    """Wherever the scan's decode is kept (memory, a scratch file) or the files are read again (neither
    fits), the training split holds each file's pixels as PIL decodes them (Keras's ``load_img``; the
    generated PNGs are already 32 px, so no resize is involved), in the split's order."""
    data = load_datasets(_data_cfg(image_dir), _storage(where))
    assert data.pixels.where == where, data.pixels
    ours = np.concatenate([x.numpy() for x, _ in data.train_in_order])
    theirs = np.stack([keras.utils.img_to_array(keras.utils.load_img(f.path)) for f in data.train_files])
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("where", PLACEMENTS)
def test_kept_pixels_are_read_once_recomputed_ones_every_epoch(own_image_dir, where):
    """Kept pixels (memory or a scratch file) come from the scan's one decode; recomputed ones are decoded
    from the files at every pass (memory bounded by the pipeline's buffers). Shown by changing a file's
    pixels between two passes."""
    data = load_datasets(_data_cfg(own_image_dir), _storage(where))
    before = next(iter(data.train_in_order))[0][0].numpy()
    path = data.train_files[0].path
    keras.utils.save_img(path, 255 - before, scale=False)  # PNG: lossless
    after = next(iter(data.train_in_order))[0][0].numpy()
    keras.utils.save_img(path, before, scale=False)
    np.testing.assert_array_equal(after, 255 - before if where == "recomputed" else before)


def test_shuffled_positions_give_the_rows_own_shuffle(image_dir):
    """The training batches gather rows at shuffled positions; they are the batches TensorFlow's own
    ``shuffle`` of the rows themselves (a buffer holding the whole split: what the pipeline did before
    it kept rows on disk) makes, pass after pass, for each phase's seed."""
    import tensorflow as tf

    data = load_datasets(_data_cfg(image_dir), _storage("disk"))
    rows = np.concatenate([x.numpy() for x, _ in data.train_in_order])
    n = len(rows)
    for phase in (1, 2):
        ours = iter(data.training_batches(phase).repeat())
        shuffle = tf.data.Dataset.from_tensor_slices(rows).shuffle(n, seed=data.seed + 1_000_003 * phase)
        theirs = iter(shuffle.batch(data.batch_size).repeat())
        for _ in range(3 * -(-n // data.batch_size)):  # three epochs
            np.testing.assert_array_equal(next(ours)[0].numpy(), next(theirs).numpy())

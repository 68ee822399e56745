"""Large folders: past the memory budgets (``cache.pixels_memory_mib``, ``cache.frozen_inputs_memory_mib``)
a run keeps its decoded pixels and frozen inputs in a scratch file on local disk and logs the same metrics
as in memory, bit for bit; with no room on disk it recomputes them, with a warning, and never crashes.

The budgets are lowered to 0 through the config keys, so the tests' 40 images are "a folder larger than
the budgets". A full disk is a real one where this process may mount a small tmpfs (root; CI runs as
root), and a scratch "folder" that is a regular file elsewhere: both make the operating system refuse the
scratch file, through the code a full disk goes through."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from finetune_ablation.config import CacheConfig
from finetune_ablation.run.kept_rows import MIB, KeptRows, Storage, place

from .helpers import history, make_cfg, runs
from .test_cache import _same_within_float_tolerance

ON_DISK = ("cache.pixels_memory_mib=0", "cache.frozen_inputs_memory_mib=0")  # a folder past both budgets

# the metrics that depend on the measurement's augmentation draws and dropout masks: recomputed frozen inputs
# with augmentation keep no epoch batches to replay, so the meter draws its own (docs/caches.md)
DRAWN = ("train_mode", "no_batchnorm", "no_dropout", "/lag", "/batchnorm", "/dropout", "/augmentation")


def _columns(count: int, seed: int) -> list[np.ndarray]:
    """Two float32 columns of different shapes (a frozen bottom's two crossing tensors)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(count, 3, 3, 4)).astype(np.float32), rng.normal(size=(count, 5)).astype(np.float32)]


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_kept_rows_read_back_what_was_written(tmp_path, where):
    """Rows written in uneven batches read back bit for bit, by shuffled index and by range; a scratch
    file is unlinked from the start (nothing in its folder) and gives its space back when closed."""
    written = _columns(37, seed=0)
    rows = KeptRows([c.shape[1:] for c in written], 37, where, tmp_path)
    for start, stop in ((0, 8), (8, 9), (9, 37)):
        rows.write(start, [c[start:stop] for c in written])
    assert list(tmp_path.iterdir()) == []
    order = np.random.default_rng(1).permutation(37)
    for got, want in zip(rows.read(order), written, strict=True):
        np.testing.assert_array_equal(got, want[order])
    for got, want in zip(rows.read_range(5, 30), written, strict=True):
        np.testing.assert_array_equal(got, want[5:30])
    rows.close()


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A real filesystem of 1 MiB (a tmpfs), unmounted after; skipped where this process may not mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    folder = tmp_path / "full-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_refused_before_writing_and_leaves_nothing(full_disk):
    """On a 1 MiB filesystem: the decision refuses a 2 MiB table (recomputed, naming the free space and
    the key), and a scratch file of 2 MiB is refused by the kernel itself (ENOSPC at the reservation)
    with nothing left behind; one that fits is written, read back and its space returned."""
    storage = Storage.from_config(CacheConfig(scratch_dir=str(full_disk), scratch_keep_free_mib=0))
    decided = place(2 * MIB, 0, "cache.pixels_memory_mib", storage)
    assert decided.where == "recomputed" and "free" in decided.reason and "scratch_keep_free_mib" in decided.reason
    assert place(MIB // 2, 0, "cache.pixels_memory_mib", storage).where == "disk"

    free = shutil.disk_usage(full_disk).free
    with pytest.raises(OSError) as refused:
        KeptRows([(MIB // 2,)], 4, "disk", full_disk)  # 4 rows of 2 MiB / 4
    assert refused.value.errno == errno.ENOSPC
    assert list(full_disk.iterdir()) == [] and shutil.disk_usage(full_disk).free == free

    fits = _columns(8, seed=2)
    rows = KeptRows([c.shape[1:] for c in fits], 8, "disk", full_disk)
    rows.write(0, fits)
    assert shutil.disk_usage(full_disk).free < free
    for got, want in zip(rows.read(np.arange(8)[::-1]), fits, strict=True):
        np.testing.assert_array_equal(got, want[::-1])
    rows.close()
    assert shutil.disk_usage(full_disk).free == free


@pytest.mark.parametrize("augment", ["none", "standard"])
def test_frozen_inputs_on_disk_are_those_in_memory_and_recomputed_ones_within_rounding(image_dir, augment):
    """One phase's frozen inputs (the bottom below FAST's layer 150) served from memory, from a scratch
    file and recomputed at every read: validation, the clean training split in order and the training
    batches of two epochs (augment=none) are bit-identical in memory and on disk; recomputed, where the
    frozen part runs in the input pipeline's graph instead of its own, within float32 rounding of the
    activations' size (1e-4 of the largest, as tests/test_cache.py's RELATIVE)."""
    from finetune_ablation.config import AugmentConfig, DataConfig, ModelConfig
    from finetune_ablation.run import feature_cache
    from finetune_ablation.run.augment import build_augmentation
    from finetune_ablation.run.data import load_datasets
    from finetune_ablation.run.model import build_classifier, freeze_base, load_base, unfreeze_top
    from finetune_ablation.run.train import seed_everything

    seed_everything(0)
    data = load_datasets(DataConfig(dir=str(image_dir), image_size=32, batch_size=8))
    model_cfg = ModelConfig(weights=None)
    base = load_base(model_cfg, 32)
    augment_cfg = AugmentConfig() if augment == "standard" else AugmentConfig(flip=None, rotation=0.0)
    clf = build_classifier(model_cfg, base, build_augmentation(augment_cfg, 0), 2, 32)
    freeze_base(base)
    unfreeze_top(base, 150, freeze_bn=False)

    def served(**keys) -> dict[str, list[np.ndarray]]:
        storage = Storage.from_config(CacheConfig(**keys))
        the_plan = feature_cache.plan(clf, len(data.train_files), len(data.val_files), storage)
        inputs = feature_cache.compute(clf, data, the_plan, 2, True, storage)
        assert inputs.placement.where == the_plan.placement.where, inputs.placement
        out = {"where": the_plan.placement.where}

        def flat(dataset) -> list[np.ndarray]:
            return [np.asarray(t) for x, y in dataset for t in (*np.atleast_1d(x), y)]

        out["val"], out["train_in_order"] = flat(inputs.val), flat(inputs.train_in_order)
        if augment == "none":
            batches = inputs.training_batches(2)
            out["training, two epochs"] = flat(batches) + flat(batches)
        return out

    memory = served()
    disk = served(frozen_inputs_memory_mib=0)
    recomputed = served(frozen_inputs_memory_mib=0, scratch_keep_free_mib=10**8)
    assert (memory["where"], disk["where"], recomputed["where"]) == ("memory", "disk", "recomputed")
    for key in memory.keys() - {"where"}:
        assert len(disk[key]) == len(recomputed[key]) == len(memory[key]) > 0, key
        for kept, on_disk, again in zip(memory[key], disk[key], recomputed[key], strict=True):
            np.testing.assert_array_equal(on_disk, kept, err_msg=key)
            np.testing.assert_allclose(again, kept, rtol=0, atol=1e-4 * float(np.abs(kept).max()), err_msg=key)


def _run(image_dir, uri, *overrides):
    from finetune_ablation.cli import run_job

    assert run_job(make_cfg(image_dir, uri, "augment=standard", "train.fine_tune_epochs=1", *overrides)) is not None
    return runs(uri)[-1]


@pytest.mark.slow
def test_a_folder_past_the_budgets_trains_from_disk_with_the_same_metrics(image_dir, tracking_uri, tmp_path, caplog):
    """The same run with everything in memory and with everything past its budget (pixels, both phases'
    frozen inputs and the epoch's augmented batches the gap measurement reads, all in scratch files):
    every logged metric at every epoch and the final weights are bit-identical, the tags say where each
    was kept, and the console says it once per decision. Then the disk refuses the scratch files (the
    scratch "folder" is a regular file): the run still finishes, says so as warnings and in its tags, its
    training is the same (with augmentation the training batches are computed in the pipeline either way)
    and its metrics are within float tolerance except those the measurement's own augmentation draw
    decides (it can no longer read the epoch's batches); its phase 1 is not stored in the phase-1 cache."""
    memory = _run(image_dir, tracking_uri)
    caplog.set_level(logging.INFO, logger="finetune_ablation")
    disk = _run(image_dir, tracking_uri, *ON_DISK)
    said = [r.getMessage() for r in caplog.records if r.name.endswith("kept_rows")]
    assert [line.split(" kept on disk")[0] for line in said] == ["decoded pixels"] + [
        f"frozen inputs of phase {p}" for p in (1, 2)
    ], said

    for run, where in ((memory, "memory"), (disk, "disk")):
        tags = run.data.tags
        for key in ("storage.decoded_pixels", "storage.frozen_inputs.phase1", "storage.frozen_inputs.phase2"):
            assert tags[key].startswith(f"{where}: "), (key, tags[key])
    assert disk.data.tags["model.weights_sha256"] == memory.data.tags["model.weights_sha256"]
    assert disk.data.metrics.keys() == memory.data.metrics.keys()
    for key in memory.data.metrics:
        assert history(tracking_uri, disk.info.run_id, key) == history(tracking_uri, memory.info.run_id, key), key

    not_a_folder = tmp_path / "scratch-is-a-file"
    not_a_folder.write_text("")
    cache = tmp_path / "phase1-cache"
    caplog.clear()
    refused = _run(
        image_dir,
        tracking_uri,
        *ON_DISK,
        f"cache.scratch_dir={not_a_folder}",
        "cache.phase1=true",
        f"cache.dir={cache}",
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.endswith("kept_rows")]
    assert len(warned) == 3 and all("Not a directory" in line for line in warned), warned
    for key in ("storage.decoded_pixels", "storage.frozen_inputs.phase1", "storage.frozen_inputs.phase2"):
        assert refused.data.tags[key].startswith("recomputed: ") and "Not a directory" in refused.data.tags[key]
    assert refused.data.tags["model.weights_sha256"] == memory.data.tags["model.weights_sha256"]
    _same_within_float_tolerance(tracking_uri, refused, memory, skip=DRAWN)
    assert refused.data.tags["phase1_cache"] == "miss"
    assert not [p for p in (cache / "phase1").iterdir() if p.is_dir()]  # not stored: computed on a fallback

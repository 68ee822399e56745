"""Bad input: one clear line naming the problem and the fix, exit code 2, the run FAILED with its error,
and nothing else in the store harmed."""

from __future__ import annotations

import shutil

import pytest

from finetune_ablation.cli import run_job

from .conftest import make_cfg, runs

pytestmark = pytest.mark.slow


def _fails(capsys, cfg, *expected: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("error: "), err
    for text in expected:
        assert text in line, line
    return line


def _assert_failed_run(tracking_uri: str, *expected: str) -> None:
    last = runs(tracking_uri)[-1]
    assert last.info.status == "FAILED"
    for text in expected:
        assert text in last.data.tags["error"]


def test_missing_data_dir(capsys, tracking_uri, tmp_path):
    _fails(capsys, make_cfg(None, tracking_uri), "data.dir is not set", "data.dir=PATH")
    _assert_failed_run(tracking_uri, "data.dir is not set")
    _fails(capsys, make_cfg(tmp_path / "nope", tracking_uri), "does not exist", "data.dir=PATH")


def test_fewer_than_two_classes(capsys, tracking_uri, own_image_dir):
    shutil.rmtree(own_image_dir / "not_alpaca")
    _fails(capsys, make_cfg(own_image_dir, tracking_uri), "1 class folder", "at least two")
    _assert_failed_run(tracking_uri, "at least two")


def test_empty_class_folder(capsys, tracking_uri, own_image_dir):
    (own_image_dir / "llama").mkdir()
    _fails(capsys, make_cfg(own_image_dir, tracking_uri), "llama has no images", "remove the empty folder")


def test_corrupt_image(capsys, tracking_uri, own_image_dir):
    (own_image_dir / "alpaca" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _fails(capsys, make_cfg(own_image_dir, tracking_uri), "corrupt image", "broken.jpg", "delete or replace")
    _assert_failed_run(tracking_uri, "broken.jpg")


def test_non_image_file(capsys, tracking_uri, own_image_dir):
    (own_image_dir / "alpaca" / "notes.txt").write_text("not a picture")
    _fails(capsys, make_cfg(own_image_dir, tracking_uri), "notes.txt is not an image", "move it out")


def test_hidden_files_and_folders_are_ignored(tracking_uri, own_image_dir):
    """OS clutter is not an error and not a class: .DS_Store, .ipynb_checkpoints."""
    (own_image_dir / "alpaca" / ".DS_Store").write_bytes(b"\0\0junk")
    (own_image_dir / ".ipynb_checkpoints").mkdir()
    from finetune_ablation.data import scan_folder

    classes, files = scan_folder(str(own_image_dir))
    assert classes == ["alpaca", "not_alpaca"] and len(files) == 40


def test_fine_tune_at_naming_no_layer_fails_before_training(capsys, tracking_uri, image_dir):
    line = _fails(capsys, make_cfg(image_dir, tracking_uri, "model.fine_tune_at=block_99_nope"), "names no layer")
    assert "0..154" in line
    last = runs(tracking_uri)[-1]
    assert "loss" not in last.data.metrics  # nothing was trained


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.dropout=1.0", "model.dropout=1.0 is out of range"),
        ("model.dropout=-0.1", "model.dropout=-0.1 is out of range"),
        ("train.fine_tune_lr=0", "train.fine_tune_lr=0.0 must be a positive number"),
        ("train.base_lr=-1e-3", "train.base_lr=-0.001 must be a positive number"),
        ("train.initial_epochs=0", "train.initial_epochs=0 must be at least 1"),
        ("train.fine_tune_epochs=-2", "train.fine_tune_epochs=-2 must be at least 1"),
        ("model.fine_tune_at=-3", "model.fine_tune_at=-3 must be a layer index"),
        ("augment.flip=sideways", "augment.flip='sideways' is unknown"),
        ("data.validation_split=1.5", "data.validation_split=1.5 must be between 0 and 1"),
    ],
)
def test_out_of_range_settings(capsys, tracking_uri, image_dir, override, expected):
    _fails(capsys, make_cfg(image_dir, tracking_uri, override), expected)
    _assert_failed_run(tracking_uri, expected)


def test_unreachable_tracking_server(capsys, image_dir):
    # loopback port 9 (discard): nothing listens, so the connection is refused at once
    _fails(
        capsys, make_cfg(image_dir, "http://127.0.0.1:9"), "cannot reach the MLflow tracking store", "start the server"
    )


def test_tracking_uri_into_missing_folder(capsys, image_dir, tmp_path):
    _fails(capsys, make_cfg(image_dir, f"sqlite:///{tmp_path}/missing/mlflow.db"), "missing folder")


def test_failure_harms_no_other_run(capsys, tracking_uri, image_dir):
    """A good run, then a failing one: the good run stays FINISHED with its metrics."""
    assert run_job(make_cfg(image_dir, tracking_uri, "train.initial_epochs=1", "train.fine_tune_epochs=1"))
    good = runs(tracking_uri)[-1]
    _fails(capsys, make_cfg(image_dir, tracking_uri, "model.dropout=2"), "out of range")
    after = {r.info.run_id: r for r in runs(tracking_uri)}
    assert after[good.info.run_id].info.status == "FINISHED"
    assert after[good.info.run_id].data.metrics == good.data.metrics
    assert [r.info.status for r in after.values()] == ["FINISHED", "FAILED"]

"""Bad input: one clear line naming the problem and the fix, exit code 2, the run FAILED with its error,
and nothing else in the store harmed. The data cases also run the real ``ablate`` in a subprocess, as a
user meets them: exactly one ``error:`` line on stderr, no traceback, no TensorFlow internals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from finetune_ablation.cli import run_job
from finetune_ablation.demo_data import write_image_folder

from .helpers import FAST, LOG_IMPORTS, imported, make_cfg, new_store, run_ablate, runs


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


def _ablate_fails(
    data_dir: Path, tmp_path: Path, *expected: str, names_alone: bool = True, env: dict[str, str] | None = None
) -> str:
    """``ablate data.dir=...`` as a user runs it: exit 2, one ``error:`` line, no traceback, run FAILED.
    What the file names alone show is refused before TensorFlow is imported (Python's import log says).
    ``env`` is added to the process's environment."""
    uri = new_store(tmp_path, "cli.db")
    log = LOG_IMPORTS if names_alone else {}
    done = run_ablate(*FAST, f"data.dir={data_dir}", f"tracking.uri={uri}", cwd=tmp_path, **log, **(env or {}))
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for noise in ("Traceback", "function_node", "[Op:", "KeyError", "Input file read error", "JPEG library"):
        assert noise not in done.stderr, done.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    (run,) = runs(uri)
    assert run.info.status == "FAILED" and expected[0] in run.data.tags["error"]
    if names_alone:
        assert imported(done, "mlflow") and not imported(done, "tensorflow")
    return errors[0]


@pytest.mark.slow
def test_corrupt_images_are_named_with_the_reason_only(tmp_path, own_image_dir):
    broken = own_image_dir / "alpaca" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    line = _ablate_fails(
        own_image_dir, tmp_path, "corrupt image", str(broken), "delete or replace the file", names_alone=False
    )
    assert f"corrupt image {broken}: Invalid JPEG data or crop window; delete or replace the file" in line


def test_empty_image_file(capsys, tracking_uri, own_image_dir):
    empty = own_image_dir / "not_alpaca" / "empty.png"
    empty.write_bytes(b"")
    _fails(capsys, make_cfg(own_image_dir, tracking_uri), f"corrupt image {empty}: Input is empty; delete")


def _two_classes(root: Path, alpaca: int, not_alpaca: int) -> Path:
    write_image_folder(root, image_size=32, per_class=max(alpaca, not_alpaca), seed=0)
    for name, keep in (("alpaca", alpaca), ("not_alpaca", not_alpaca)):
        for extra in sorted((root / name).glob("*.png"))[keep:]:
            extra.unlink()
    return root


@pytest.mark.slow
def test_a_class_without_validation_images_is_refused(tmp_path):
    """3 + 30 images, split 0.2, seed 42: Keras puts none of the 3 in validation (6 images, all of the
    other class), so validation accuracy would measure one class. Refused before TensorFlow is imported."""
    import keras

    data = _two_classes(tmp_path / "few", 3, 30)
    _, keras_val = keras.utils.image_dataset_from_directory(
        str(data), validation_split=0.2, subset="both", seed=42, batch_size=None, image_size=(32, 32), verbose=False
    )
    assert len(keras_val.file_paths) == 6 and not any("/alpaca/" in p for p in keras_val.file_paths)
    line = _ablate_fails(data, tmp_path, "class alpaca has none of its 3 images in the validation split")
    assert "data.validation_split=0.2, data.seed=42" in line and "add images to alpaca" in line


@pytest.mark.slow
def test_too_few_images_for_a_validation_split_gives_the_real_reason(tmp_path):
    """2 + 2 images: 0.2 x 4 rounds down to 0 validation images (Keras says "No training images found")."""
    data = _two_classes(tmp_path / "tiny", 2, 2)
    line = _ablate_fails(data, tmp_path, "data.validation_split=0.2 of 4 images")
    assert "rounds down to 0 validation images" in line and "at least 5" in line
    assert "No training images" not in line


# What TensorFlow raises when its native runtime does not load (tensorflow/python/pywrap_tensorflow.py):
# an ImportError of a dozen lines around the real cause, a shared library that is missing or unreadable
_BROKEN_TENSORFLOW = """
try:
    raise ImportError("libtensorflow_framework.so.2: cannot open shared object file: No such file or directory")
except ImportError as exc:
    raise ImportError("Traceback ...\\n\\nFailed to load the native TensorFlow runtime.") from exc
"""


@pytest.mark.slow
def test_a_tensorflow_that_cannot_be_imported_is_one_line_naming_the_cause_and_the_reinstall(tmp_path, image_dir):
    """A broken TensorFlow install (a package named tensorflow ahead of the real one on the path, failing as
    TensorFlow does when its native runtime is missing): one line with the root cause and the command that
    reinstalls the installed version, the run FAILED. ``ablate-pretrain`` says the same."""
    broken = tmp_path / "broken" / "tensorflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(_BROKEN_TENSORFLOW)
    path = os.pathsep.join(p for p in (str(broken.parent), os.environ.get("PYTHONPATH")) if p)
    pin = f"tensorflow=={metadata.version('tensorflow')}"  # the installed one: the fix keeps the user's TensorFlow
    line = _ablate_fails(
        image_dir,
        tmp_path,
        "TensorFlow cannot be imported (ImportError: libtensorflow_framework.so.2: cannot open shared object file",
        f" -m pip install --force-reinstall {pin}",
        names_alone=False,
        env={"PYTHONPATH": path},
    )
    assert "Failed to load" not in line  # the wrapper's text is not the cause
    python = Path(line.split(": reinstall it in this environment: ")[1].split(" -m pip")[0])
    assert python.parent == Path(sys.executable).parent  # this environment's interpreter, not any on PATH
    pretrain = Path(sys.executable).with_name("ablate-pretrain")
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [str(pretrain), "--quick", "--out", str(tmp_path / "base")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert line.startswith(done.stderr.strip().splitlines()[-1])  # the same line, less the run it marked FAILED
    assert not (tmp_path / "base").exists()


def test_non_image_file(capsys, tracking_uri, own_image_dir):
    (own_image_dir / "alpaca" / "notes.txt").write_text("not a picture")
    _fails(capsys, make_cfg(own_image_dir, tracking_uri), "notes.txt is not an image", "move it out")


def test_an_image_that_cannot_be_read_is_named_in_one_line(capsys, tracking_uri, own_image_dir):
    """A link whose target is gone: one line naming it, from the run and not a traceback from resume,
    which reads every file before a job knows whether it trains (it leaves the error to the run)."""
    from finetune_ablation.run import resume

    (own_image_dir / "alpaca" / "gone.png").symlink_to(own_image_dir / "nowhere.png")
    cfg = make_cfg(own_image_dir, tracking_uri)
    assert resume.data_fingerprint(cfg) is None
    _fails(capsys, cfg, "gone.png cannot be read (No such file or directory)", "remove it from the data folder")
    _assert_failed_run(tracking_uri, "gone.png cannot be read")


def test_hidden_files_and_folders_are_ignored(tracking_uri, own_image_dir):
    """OS clutter is not an error and not a class: .DS_Store, ._x.jpg, .ipynb_checkpoints (the split is
    tested against Keras's own in test_data_model.py)."""
    (own_image_dir / "alpaca" / ".DS_Store").write_bytes(b"\0\0junk")
    (own_image_dir / "alpaca" / "._alpaca_000.jpg").write_bytes(b"\0\x05\x16\x07 Mac OS X")
    (own_image_dir / ".ipynb_checkpoints").mkdir()
    from finetune_ablation.run.data import scan_folder

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


@pytest.mark.slow
def test_failure_harms_no_other_run(capsys, tracking_uri, image_dir):
    """A good run, then a failing one: the good run stays FINISHED with its metrics."""
    assert run_job(make_cfg(image_dir, tracking_uri, "train.initial_epochs=1", "train.fine_tune_epochs=1"))
    good = runs(tracking_uri)[-1]
    _fails(capsys, make_cfg(image_dir, tracking_uri, "model.dropout=2"), "out of range")
    after = {r.info.run_id: r for r in runs(tracking_uri)}
    assert after[good.info.run_id].info.status == "FINISHED"
    assert after[good.info.run_id].data.metrics == good.data.metrics
    assert [r.info.status for r in after.values()] == ["FINISHED", "FAILED"]

"""``ablate-reproduce`` (issue 6): a logged run runs again bit for bit; a logged run that names code,
holds an unknown key or reads the environment is refused before anything runs; a changed dataset stops.

The original run is made by the real ``ablate`` CLI (so its Hydra overrides are logged) and reproduced by
the real ``ablate-reproduce`` console script, each in its own process. Tampered runs are copies of the
original written with ``MlflowClient``, as an untrusted tracking server could serve them."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import yaml

from finetune_ablation.reproduce import app as reproduce
from finetune_ablation.reproduce.rebuild import (
    check_overrides,
    check_untrusted,
    drop_sweep_handoff,
    find_interpolations,
    find_keys,
    validate_against_schema,
)

from .helpers import FAST, LOG_IMPORTS, SKIPPED, artifact_text, history, imported, new_store, run_ablate, runs

EXPERIMENT = "repro"


def _original_args(image_dir: Path, uri: str) -> list[str]:
    """The original run's settings (the tests' fast ones, one epoch per phase)."""
    return [
        *FAST,
        f"data.dir={image_dir}",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        "train.initial_epochs=1",
        "train.fine_tune_epochs=1",
        "model.fine_tune_at=150",  # still unfreezes the last conv and its BatchNorm; faster to trace
    ]


@pytest.fixture(scope="module")
def original(tmp_path_factory, image_dir):
    """One run logged by the ``ablate`` CLI: (tracking URI, run)."""
    tmp = tmp_path_factory.mktemp("repro")
    uri = new_store(tmp)
    done = run_ablate(*_original_args(image_dir, uri), "tracking.run_name=original", cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(uri, EXPERIMENT)
    return uri, run


@pytest.fixture(scope="module")
def reproduced(original, tmp_path_factory):
    """``ablate-reproduce RUN_ID`` as a user runs it: (completed process, new run)."""
    uri, run = original
    exe = Path(sys.executable).with_name("ablate-reproduce")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [str(exe), run.info.run_id, "--tracking-uri", uri],
        cwd=tmp_path_factory.mktemp("cwd"),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    again = [r for r in runs(uri, EXPERIMENT) if r.data.tags.get("reproduced_from") == run.info.run_id]
    return done, again


def _config(original) -> dict:
    uri, run = original
    return yaml.safe_load(artifact_text(uri, run.info.run_id, "config.yaml"))


def copy_run(original, config: dict | None = None, tags: dict | None = None, status: str | None = "FINISHED") -> str:
    """A copy of the original run as another (possibly hostile) store could serve it."""
    uri, run = original
    client = mlflow.MlflowClient(uri)
    kept = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    copy = client.create_run(run.info.experiment_id, run_name="copy", tags={**kept, **(tags or {})})
    client.log_text(copy.info.run_id, yaml.safe_dump(config or _config(original)), "config.yaml")
    if status:
        client.set_terminated(copy.info.run_id, status)
    return copy.info.run_id


def refused_with_output(capsys, *argv: str) -> tuple[str, str]:
    """Run ``ablate-reproduce`` in-process; it must exit 2 with exactly one ``error:`` line.
    Returns that line and the whole stderr."""
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0], err


def refused(capsys, *argv: str) -> str:
    return refused_with_output(capsys, *argv)[0]


def reproductions_of(uri: str, run_id: str) -> list:
    return [r for r in runs(uri, EXPERIMENT) if r.data.tags.get("reproduced_from") == run_id]


# --- the real thing ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_reproduction_exits_0_with_max_diff_0(reproduced):
    done, again = reproduced
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max |diff| = 0 (tolerance 0): match" in done.stdout
    assert "cudart_stub" not in done.stderr and "absl::InitializeLog" not in done.stderr  # no start-up chatter
    (new,) = again
    assert new.info.status == "FINISHED"
    assert new.data.metrics["reproduce/max_abs_diff"] == 0.0
    assert new.data.tags["reproduce.match"] == "true"


@pytest.mark.slow
def test_logged_overrides_recompose_to_the_logged_config(reproduced):
    """Same conf/ today: re-composing the CLI's overrides gives the logged config, so no key differs."""
    done, _ = reproduced
    assert "warning: config key" not in done.stderr
    assert "not re-composed" not in done.stderr and "cannot compose" not in done.stderr


@pytest.mark.slow
def test_every_per_epoch_metric_is_identical(original, reproduced):
    uri, run = original
    (new,) = reproduced[1]
    assert set(run.data.metrics) == set(new.data.metrics) - {"reproduce/max_abs_diff"}
    assert {"val_accuracy", "gap/total", "gap_loss/split"} <= set(run.data.metrics)
    for key in run.data.metrics:
        assert history(uri, run.info.run_id, key) == history(uri, new.info.run_id, key), key
    assert new.data.tags["config_hash"] == run.data.tags["config_hash"]
    assert new.data.tags["model.weights_sha256"] == run.data.tags["model.weights_sha256"]
    table = artifact_text(uri, new.info.run_id, "reproduce_comparison.csv")
    assert table.startswith("metric,values,max_abs_diff,problem")


@pytest.mark.slow
def test_a_resumed_sweep_never_reuses_a_reproduction(original, reproduced, image_dir, tmp_path):
    """The reproduction is the newest FINISHED run of this config; a sweep of the same config must skip
    with a run that is not a reproduction, and train nothing (TensorFlow is not even imported)."""
    uri, run = original
    (reproduction,) = reproduced[1]
    assert reproduction.info.start_time > run.info.start_time
    done = run_ablate("-m", *_original_args(image_dir, uri), f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      cwd=tmp_path, **LOG_IMPORTS)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (skip,) = [line for line in (done.stdout + done.stderr).splitlines() if SKIPPED in line]
    reused = skip.split(SKIPPED, 1)[1].split()[0]
    assert reused != reproduction.info.run_id
    assert "reproduced_from" not in mlflow.MlflowClient(uri).get_run(reused).data.tags
    assert not imported(done, "tensorflow")


# --- refusals: nothing named by a logged run runs here ------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda c: c["model"].update({"_target_": "os.system"}), "names code to instantiate (model._target_)"),
        # fine_tune_at is typed Any in the schema: the search for _target_ anywhere catches it first
        (lambda c: c["model"].update({"fine_tune_at": {"_target_": "builtins.exec"}}), "model.fine_tune_at._target_"),
        (lambda c: c["model"].update({"evil_key": 1}), "does not fit the schema"),
        (lambda c: c.update({"evil_top_level": 1}), "at evil_top_level"),
        (lambda c: c["tracking"].update({"run_name": "${oc.env:HOME}"}), "interpolations"),
        (lambda c: c["model"].update({"dropout": 3.0}), "model.dropout=3.0 is out of range"),
    ],
    ids=["target", "target_in_any_field", "unknown_key", "unknown_top_key", "interpolation", "out_of_range"],
)
@pytest.mark.slow
def test_tampered_logged_config_is_refused(original, capsys, tamper, expected):
    uri, _ = original
    config = _config(original)
    tamper(config)
    copy_id = copy_run(original, config)
    line = refused(capsys, copy_id, "--tracking-uri", uri)
    assert expected in line
    assert "refused" in line or "range checks" in line
    assert reproductions_of(uri, copy_id) == []


@pytest.mark.slow
@pytest.mark.parametrize("override", ["+model._target_=os.system", "hydra.job.chdir=true", "hydra/launcher=basic"])
def test_tampered_overrides_tag_is_refused(original, capsys, override):
    uri, run = original
    tag = f"{run.data.tags['hydra.overrides']} {override}"
    copy_id = copy_run(original, tags={"hydra.overrides": tag})
    line = refused(capsys, copy_id, "--tracking-uri", uri)
    assert "refused" in line
    assert reproductions_of(uri, copy_id) == []


@pytest.mark.slow
def test_changed_dataset_is_refused(original, own_image_dir, capsys):
    uri, _ = original
    config = _config(original)
    config["data"]["dir"] = str(own_image_dir)
    first, second = sorted((own_image_dir / "alpaca").glob("*.png"))[:2]
    first.write_bytes(second.read_bytes())  # one image changed: same names, other content
    copy_id = copy_run(original, config)
    line, err = refused_with_output(capsys, copy_id, "--tracking-uri", uri)
    assert f"the dataset at data.dir={own_image_dir} differs" in line
    assert "--allow-data-change" in line
    assert reproductions_of(uri, copy_id) == []
    # the copy's overrides name the original folder: reported, and the logged folder is the one checked
    assert f"warning: config key data.dir: logged '{own_image_dir}', today's conf/ gives" in err
    assert "(logged value used)" in err


@pytest.mark.slow
def test_allow_data_change_goes_on_with_a_warning(original, own_image_dir, capsys):
    """Past the data check the run really starts: here it fails fast on a layer name that does not exist,
    which shows the logged value won over the re-composed one (the overrides say fine_tune_at=100)."""
    uri, _ = original
    config = _config(original)
    config["data"]["dir"] = str(own_image_dir)
    config["model"]["fine_tune_at"] = "no_such_layer"
    (own_image_dir / "alpaca" / "alpaca_000.png").unlink()
    copy_id = copy_run(original, config)
    line = refused(capsys, copy_id, "--tracking-uri", uri, "--allow-data-change")
    assert "model.fine_tune_at='no_such_layer' names no layer" in line
    (failed,) = reproductions_of(uri, copy_id)
    assert failed.info.status == "FAILED"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _victim(root: Path) -> Path:
    """A folder someone cares about, shaped like a demo folder (the old code deleted its PNGs)."""
    for name in ("alpaca", "not_alpaca"):
        (root / name).mkdir(parents=True)
        (root / name / "holiday.png").write_bytes(b"not yours to delete")
    (root / "notes.txt").write_text("mine")
    return root


def _private_data_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("ablate-reproduce-data-*"))


@pytest.mark.slow
def test_a_crafted_synthetic_run_cannot_make_reproduce_write_outside(original, capsys, tmp_path):
    """A logged run with data.synthetic=true names where its images were generated. Reproducing it
    once wrote and deleted PNGs there before any refusal; now it writes only its own temporary folder."""
    uri, _ = original
    victim = _victim(tmp_path / "victim")
    before, paths_before, private_before = _tree(victim), sorted(victim.rglob("*")), _private_data_dirs()
    config = _config(original)
    config["data"].update({"dir": str(victim), "synthetic": True, "synthetic_images_per_class": 20})
    copy_id = copy_run(original, config)  # its fingerprint tag is the original folder's: refused
    line, err = refused_with_output(capsys, copy_id, "--tracking-uri", uri)
    assert "the dataset at the regenerated images (data.synthetic=true) differs" in line
    assert f"nothing is written at the logged data.dir={victim}" in err
    assert _tree(victim) == before and sorted(victim.rglob("*")) == paths_before
    assert _private_data_dirs() == private_before  # removed again
    assert reproductions_of(uri, copy_id) == []


@pytest.mark.slow
def test_a_synthetic_run_reproduces_bit_for_bit_from_regenerated_images(tmp_path):
    """The legitimate case: the demo folder is gone (here: replaced by someone's files), the images
    are generated again from the logged seed and count, and every metric matches."""
    demo, uri = tmp_path / "demo", new_store(tmp_path)
    synthetic = ["data.synthetic=true", "data.synthetic_images_per_class=20", f"data.dir={demo}"]
    done = run_ablate(
        *FAST,
        *synthetic,
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        "train.initial_epochs=1",
        "train.fine_tune_epochs=1",
        "model.fine_tune_at=150",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs(uri, EXPERIMENT)
    shutil.rmtree(demo)
    victim = _victim(demo)
    before = _tree(victim)
    exe = Path(sys.executable).with_name("ablate-reproduce")
    again = subprocess.run(
        [str(exe), run.info.run_id, "--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "max |diff| = 0 (tolerance 0): match" in again.stdout
    assert _tree(victim) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("status", "tags", "expected"),
    [
        ("FAILED", {}, "is FAILED: only FINISHED runs"),
        (None, {}, "is RUNNING"),
        ("FINISHED", {"pruned": "true"}, "was pruned"),
        ("FINISHED", {"sweep.role": "parent"}, "sweep's parent run"),
    ],
)
def test_runs_that_cannot_be_compared_are_refused(original, capsys, status, tags, expected):
    uri, _ = original
    copy_id = copy_run(original, tags=tags, status=status)
    assert expected in refused(capsys, copy_id, "--tracking-uri", uri)


@pytest.mark.slow
def test_unknown_run_and_missing_store_are_one_line_errors(original, capsys, tmp_path):
    uri, _ = original
    assert "no MLflow run 'nope'" in refused(capsys, "nope", "--tracking-uri", uri)
    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert "no MLflow store" in refused(capsys, "nope", "--tracking-uri", missing)
    assert not (tmp_path / "none").exists()


# --- pure parts ---------------------------------------------------------------------------------------


def test_compare_finds_the_largest_difference():
    same = {"loss": [(0, 0.5), (1, 0.25)], "val_accuracy": [(0, 0.5), (1, math.nan)]}
    assert reproduce.compare(same, same).max_abs_diff == 0.0
    moved = {**same, "loss": [(0, 0.5), (1, 0.5)]}
    result = reproduce.compare(same, moved)
    assert result.max_abs_diff == 0.25
    assert result.matches(0.25) and not result.matches(0.0)
    assert reproduce.compare(same, {"loss": same["loss"]}).max_abs_diff == math.inf
    shorter = {**same, "loss": [(0, 0.5)]}
    table = reproduce.compare(same, shorter).table.set_index("metric")
    assert table.loc["loss", "problem"] == "different epochs"
    assert reproduce.compare(same, {**same, "val_accuracy": [(0, 0.5), (1, 0.5)]}).max_abs_diff == math.inf


def test_untrusted_data_is_searched_everywhere():
    data = {"a": [{"b": {"_target_": "x"}}], "c": {"_partial_": True}, "d": "ok", "e": ["${oc.env:HOME}"]}
    assert find_keys(data, frozenset({"_target_", "_partial_"})) == ["a[0].b._target_", "c._partial_"]
    assert find_interpolations(data) == ["e[0]"]


def test_overrides_that_cannot_be_recomposed_safely_are_not():
    assert check_overrides(["model.dropout=0.1", "augment=none", "+x=1"], "r") == (
        ["model.dropout=0.1", "augment=none", "+x=1"],
        None,
    )
    assert "sweep" in check_overrides(["model.dropout=0.1,0.2"], "r")[1]
    assert "interpolation" in check_overrides(["data.dir=${oc.env:HOME}"], "r")[1]
    assert "option name" in check_overrides(["model=../../../tmp/evil"], "r")[1]


def test_an_optuna_trial_runs_again_outside_its_study():
    """A trial's logged config holds the sweeper's hand-off to its live study, with a pruner _target_:
    it is dropped unread (never instantiated, never reported to), and the rest is checked as usual."""
    handoff = {
        "study_name": "s",
        "storage": "sqlite:///x.db",
        "trial_number": 3,
        "pruner": {"_target_": "optuna.pruners.MedianPruner"},
    }
    data, was_trial = drop_sweep_handoff({"seed": 7, "optuna": handoff})
    assert was_trial and data == {"seed": 7}
    check_untrusted(data, "r")
    assert validate_against_schema(data, "r").optuna is None
    override = (
        "optuna={study_name:s,storage:'sqlite:///x.db',trial_number:3,pruner:{_target_:optuna.pruners.MedianPruner}}"
    )
    assert check_overrides(["seed=7", override], "r") == (["seed=7"], None)
    assert drop_sweep_handoff({"seed": 7, "optuna": None}) == ({"seed": 7, "optuna": None}, False)

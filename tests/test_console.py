"""The console: one short line per epoch, no start-up chatter, and where to look at the end of a run; and
what a run from the command line records of the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from finetune_ablation.console import epoch_line, where_to_look

from .helpers import FAST, new_store, run_ablate, runs
from .servers import free_port, http_get, serving

LOGS = {
    "loss": 0.51234,
    "accuracy": 0.75,
    "val_accuracy": 0.875,
    "val_accuracy_ci_low": 0.7321,
    "val_accuracy_ci_high": 0.9456,
    "gap/total": 0.125,
    "gap/lag": 0.03,
    "gap/batchnorm": 0.0,
    "gap/dropout": 0.06,
    "gap/augmentation": -0.075,  # largest by size, though negative
    "gap/split": 0.11,
    "train_mode_accuracy": 0.7,  # one of the many metrics that stay out of the line
}


def test_epoch_line_holds_the_few_numbers_a_person_reads():
    line = epoch_line(1, 2, 5, LOGS)
    assert line == (
        "phase 1  epoch  3/5  loss 0.512  accuracy 0.750  val_accuracy 0.875 [0.73, 0.95]  "
        "gap +12.5 pts (largest: split +11.0)"
    )
    assert "\n" not in line and "train_mode" not in line


def test_epoch_line_names_the_largest_component_by_size_whatever_its_sign():
    logs = {**LOGS, "gap/augmentation": -0.2}
    assert epoch_line(2, 7, 10, logs).endswith("(largest: augmentation -20.0)")


def test_epoch_line_without_gap_measurement_leaves_the_gap_out():
    logs = {"loss": 0.2, "accuracy": 0.9, "val_accuracy": 0.8}
    assert epoch_line(2, 5, 10, logs) == "phase 2  epoch  6/10  loss 0.200  accuracy 0.900  val_accuracy 0.800"


def test_a_difference_that_rounds_to_zero_is_written_plus_zero_everywhere():
    """Two equal accuracies subtract to -1e-9 in float32; no page says "lag -0.0"."""
    from finetune_ablation.gap.sentence import gap_sentence

    row = {"gap/total": 0.044, "gap/augmentation": 0.069, "gap/split": -0.037, "gap/dropout": 0.012}
    row |= {"gap/lag": -1e-9, "gap/batchnorm": 0.0}
    assert gap_sentence(row) == (
        "validation beats training by 4.4 points: augmentation +6.9, split -3.7, dropout +1.2, lag +0.0, batchnorm +0.0"
    )
    assert epoch_line(0, 0, 1, {**LOGS, "gap/total": -1e-9}).endswith("gap +0.0 pts (largest: split +11.0)")
    assert gap_sentence({**row, "gap/total": -0.05}).startswith("training beats validation by 5.0 points: ")


def test_the_words_and_the_title_follow_the_sign_of_the_total_and_a_zero_reads_level():
    """A total that rounds to 0.0 points is "level" (never "validation beats training by 0.0 points"),
    a negative one says training beats validation, in the sentence and in the figure's title."""
    from finetune_ablation.gap.sentence import gap_sentence, headline

    row = {"gap/total": 0.044, "gap/augmentation": 0.069, "gap/split": -0.037, "gap/dropout": 0.012}
    row |= {"gap/lag": -1e-9, "gap/batchnorm": 0.0}
    for total in (-1e-9, 0.0004, -0.0004):
        assert gap_sentence({**row, "gap/total": total}).startswith("validation and training are level (0.0 points): ")
        assert headline(total).startswith("Validation and training level")
    assert gap_sentence({**row, "gap/total": -0.0005}).startswith("training beats validation by 0.1 points: ")
    assert headline(-0.05).startswith("Why training beats validation")
    assert headline(0.05).startswith("Why validation beats training")


def test_each_phase_line_of_the_summary_carries_its_own_chance_check():
    """Phase 1 at chance (4 of 8 right, majority 0.5) says so on its own line; phase 2 (8 of 8) does not;
    the run's warning, if any, stays the first line."""
    from finetune_ablation.gap.sentence import gap_summary

    components = {f"gap/{c}": 0.0 for c in ("lag", "batchnorm", "dropout", "augmentation", "split")}
    rows = [
        {"phase": 1, "epoch": 0, "val_accuracy": 0.5, "gap/total": 0.1, **components},
        {"phase": 2, "epoch": 1, "val_accuracy": 1.0, "gap/total": 0.1, **components},
    ]
    lines = gap_summary(rows, val_count=8, majority=0.5).splitlines()
    assert lines[0].startswith("phase 1, epoch 1 (step 0), AT CHANCE (val_accuracy 0.500, 95% interval 0.215-0.785")
    assert lines[1].startswith("phase 2, epoch 2 (step 1): validation beats training by 10.0 points")
    assert "lag = " in lines[-1] and "the very batches" in lines[-1]
    assert gap_summary(rows, "AT CHANCE: run").startswith("AT CHANCE: run\n\nphase 1, epoch 1 (step 0): ")


def test_where_to_look_for_a_local_store_gives_the_ui_command_and_the_run_url():
    text = where_to_look("sqlite:////abs/path/mlruns/mlflow.db", "3", "abc123")
    assert text.splitlines() == [
        "MLflow run abc123",
        "  see it:  mlflow ui --backend-store-uri sqlite:////abs/path/mlruns/mlflow.db",
        "  then open http://127.0.0.1:5000/#/experiments/3/runs/abc123",
    ]


def test_where_to_look_for_a_server_links_the_server_and_hides_passwords():
    assert where_to_look("http://127.0.0.1:5005/", "1", "r", "sweep").splitlines() == [
        "MLflow sweep r",
        "  open http://127.0.0.1:5005/#/experiments/1/runs/r",
    ]
    text = where_to_look("postgresql://me:secret@127.0.0.1:5432/db", "1", "r")
    assert "secret" not in text and "postgresql://me:***@127.0.0.1:5432/db" in text


def test_start_up_filter_drops_the_chatter_and_keeps_real_messages(tmp_path):
    """C++ code writes to file descriptor 2 directly; the filter must work at that level."""
    script = (
        "import os, sys\n"
        "from finetune_ablation.console import _filtered_stderr\n"
        "with _filtered_stderr():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written\\n')\n"
        "    os.write(2, b'I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your machine\\n')\n"
        "    os.write(2, b'E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL\\n')\n"
        "    os.write(2, b'W0000 a warning that matters\\n')\n"
        "    print('python warning', file=sys.stderr)\n"
        "os.write(2, b'after\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["W0000 a warning that matters", "python warning", "after"]


@pytest.fixture(scope="module")
def command_line_run(image_dir, tmp_path_factory) -> tuple[Path, str, subprocess.CompletedProcess]:
    """One ``ablate`` run as a user types it (the tests' fast settings): its folder, store and output."""
    folder = tmp_path_factory.mktemp("command-line-run")
    uri = new_store(folder)
    result = run_ablate(*FAST, f"data.dir={image_dir}", f"tracking.uri={uri}", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, uri, result


@pytest.mark.slow
def test_a_run_from_the_command_line_records_its_overrides_and_hydra_files(command_line_run):
    _, uri, _ = command_line_run
    (run,) = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hydra.overrides"].startswith("data.image_size=32")
    hydra_files = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id, ".hydra")}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"} <= hydra_files


@pytest.mark.slow
def test_a_run_prints_short_epochs_no_chatter_and_a_ui_command_that_opens_the_run(command_line_run):
    tmp_path, uri, result = command_line_run
    output = result.stdout + result.stderr
    for chatter in ("cudart_stub", "cuInit", "absl::InitializeLog"):
        assert chatter not in output
    epochs = [line for line in result.stdout.splitlines() if line.startswith("phase ")]
    assert [line.split()[:4] for line in epochs] == [
        ["phase", "1", "epoch", "1/2"],
        ["phase", "1", "epoch", "2/2"],
        ["phase", "2", "epoch", "3/4"],
        ["phase", "2", "epoch", "4/4"],
    ]
    assert all(len(line) < 130 and "gap " in line and "largest: " in line for line in epochs)

    (run,) = runs(uri)
    experiment = mlflow.MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    lines = result.stdout.strip().splitlines()
    tail = lines[-3:]
    # 8 validation images: the run is at chance, and its console says so after its last epoch
    assert run.data.tags["gap.at_chance"] == "true"
    said = [i for i, line in enumerate(lines) if line.startswith("AT CHANCE: val_accuracy ")]
    assert len(said) == 1 and said[0] > max(i for i, line in enumerate(lines) if line.startswith("phase "))
    assert tail[0] == f"MLflow run {run.info.run_id}"
    command = tail[1].split("see it:", 1)[1].strip()
    assert command == f"mlflow ui --backend-store-uri {uri}"
    url = tail[2].split("then open", 1)[1].strip()
    assert url == f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"

    # The printed command really serves this run (on a free port instead of 5000, with one web worker
    # instead of four: the same app, half the CPU-seconds to start, docs/speed.md round eleven).
    port = free_port()
    args = [
        str(Path(sys.executable).with_name("mlflow")),
        *command.split()[1:],
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    with serving(args, tmp_path / "mlflow-ui.log", f"http://127.0.0.1:{port}/health", "mlflow ui"):
        body = http_get(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}")
    assert run.info.run_id in body

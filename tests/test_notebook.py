"""notebooks/course_exercise.ipynb, the course's exercise offline (docs/notebook.md), executed end to end.

nbclient runs it in a kernel of its own (ipykernel), started from a kernel spec this test writes, so the
kernel's Python is the one named here, never a kernel registered elsewhere on the machine:

- ``current``: this environment's Python, the working tree's code;
- ``oldest`` and ``next``: the extra virtualenvs of tests/other_keras.py (Keras 3.5 on TensorFlow 2.16; the
  next Keras), each holding the project installed with a plain, non-editable ``pip install .``. Their kernel
  runs in Python's isolated mode (``-I``: no ``PYTHONPATH``, no working directory on the path), and the
  notebook reports which file it imported, so the test proves that the installed copy alone runs it.

The test appends one cell to the notebook it executes (the committed file is not changed): it prints, as
JSON, what the notebook computed (the check's findings, the callback's rows) and Keras's own ``evaluate`` of
the training split with the final weights. Compared with computations that do not share the callback's
code: Keras's own ``val_accuracy - accuracy`` (the components must add up to it), ``evaluate`` (the clean
condition), the ``CSVLogger`` file the notebook wrote (Keras's writer, after the callback), and what each
Keras does with ``training=False`` as tests/keras_behaviour.py measures it without the suite (BEHAVIOUR).

The committed notebook carries no outputs (``test_the_committed_notebooks_carry_no_outputs``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from .other_keras import BEHAVIOUR, KERAS_FAMILY, REPO, by_name, require, venvs_dir

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "course_exercise.ipynb"
KERNEL = "finetune-ablation-test"
COMPONENTS = ("lag", "batchnorm", "dropout", "augmentation", "split")
EPOCHS = 5  # per phase, as the notebook (and the course) trains
RELATIVE = 1e-4  # float32 through a MobileNetV2: docs/stack-facts.md's tolerance for a forward pass

REPORT = """
import json, sys
import keras
import finetune_ablation
from finetune_ablation.gap import callback as _callback_module

_train = model2.evaluate(gap.train_data, return_dict=True, verbose=0)
print(json.dumps({
    "python": sys.executable,
    "suite": finetune_ablation.__file__,
    "callback_module": _callback_module.__file__,
    "keras": keras.__version__,
    "findings": [[f.severity, f.message] for f in findings],
    "findings_unfrozen": [[f.severity, f.message] for f in findings_unfrozen],
    "rows": gap.rows,
    "how": gap.how,
    "summary": text,
    "train_evaluate": {"loss": float(_train["loss"]), "accuracy": float(_train["accuracy"])},
    "train_logits": model2.predict(gap.train_data, verbose=0)[:, 0].tolist(),
}))
"""


def test_the_committed_notebooks_carry_no_outputs():
    """Notebooks live in git without outputs or execution counts: a diff shows code, not a run's numbers."""
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert NOTEBOOK in paths
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {index} has outputs"


def _kernel_environment(isolated: bool) -> dict[str, str]:
    """The kernel's environment: this one, without what belongs to this process when the kernel must see
    only its own virtualenv's installed packages."""
    drop = {"VIRTUAL_ENV", "PYTHONHOME", "TF_USE_LEGACY_KERAS", "PYTEST_ADDOPTS"}
    if isolated:
        drop.add("PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def execute(python: Path, workdir: Path, isolated: bool) -> tuple[nbformat.NotebookNode, float]:
    """The notebook with the report cell appended, executed in ``workdir`` by a kernel running ``python``."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT))
    kernels = workdir / "kernels"
    (kernels / KERNEL).mkdir(parents=True)
    argv = [str(python), *(["-I"] if isolated else []), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs, ip="127.0.0.1")  # loopback only
    client = NotebookClient(
        notebook, km=manager, timeout=600, startup_timeout=300, resources={"metadata": {"path": str(workdir)}}
    )
    start = time.perf_counter()
    client.execute(env=_kernel_environment(isolated))
    return notebook, time.perf_counter() - start


def _stream(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.fixture(scope="module", params=["current", "oldest", "next"])
def executed(request, tmp_path_factory) -> dict:
    env = require(by_name(request.param))
    workdir = tmp_path_factory.mktemp(f"notebook-{env.name}")
    notebook, seconds = execute(env.python, workdir, isolated=env.venv is not None)
    print(f"{NOTEBOOK.name} under {env.name}: executed in {seconds:.1f} s")
    report = json.loads(_stream(notebook.cells[-1]).strip().splitlines()[-1])
    return {"env": env, "notebook": notebook, "report": report, "workdir": workdir, "seconds": seconds}


@pytest.mark.slow
def test_every_cell_ran_in_the_named_python_and_suite(executed):
    env, report = executed["env"], executed["report"]
    for index, cell in enumerate(executed["notebook"].cells):
        if cell.cell_type == "code":
            assert cell.execution_count is not None, index
            assert not [o for o in cell.outputs if o.output_type == "error"], index
    assert report["python"] == str(env.python)
    assert report["keras"].startswith(KERAS_FAMILY[env.name]), report["keras"]
    if env.venv is None:  # this environment: the working tree
        assert Path(report["suite"]).is_relative_to(REPO / "src"), report["suite"]
    else:  # the non-editable install in the virtualenv, nothing of the working tree
        site = venvs_dir() / env.venv / "lib"
        for name in ("suite", "callback_module"):
            path = Path(report[name])
            assert path.is_relative_to(site) and "site-packages" in path.parts, (name, path)


@pytest.mark.slow
def test_the_check_finds_what_this_keras_does(executed):
    report = executed["report"]
    bn_kept, dropout_on = BEHAVIOUR[executed["env"].name]

    def severities(findings, text):
        return [severity for severity, message in findings if text in message]

    before, unfrozen = report["findings"], report["findings_unfrozen"]
    assert severities(before, "model.layers[2] is mobilenetv2_0.35_64 itself") == ["ok"]  # question 1
    assert severities(before, "thresholds them at 0.5") == ["problem"]  # the course's metric on logits
    assert severities(before, "none of the 80 validation images is a copy") == ["ok"]
    assert severities(unfrozen, "the trainable set changed since the last compile") == ["problem"]
    # question 3, for this Keras: the unfrozen BatchNorm under base_model(x, training=False)
    assert severities(unfrozen, "12 BatchNormalization layers of mobilenetv2_0.35_64 are trainable") == [
        "ok" if bn_kept else "problem"
    ]
    dropout_line = "a Dropout placed after a call given training=False is OFF during fit"
    assert severities(unfrozen, dropout_line) == ([] if dropout_on else ["problem"])


@pytest.mark.slow
def test_the_components_add_up_to_keras_own_gap_in_both_phases(executed):
    rows = executed["report"]["rows"]
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1 + e // EPOCHS, e) for e in range(2 * EPOCHS)]
    for r in rows:
        assert r["gap/total"] == r["val_accuracy"] - r["accuracy"], r
        assert math.fsum(r[f"gap/{c}"] for c in COMPONENTS) == pytest.approx(r["gap/total"], abs=1e-12), r
        loss_total = r["val_loss"] - r["loss"]
        assert math.fsum(r[f"gap_loss/{c}"] for c in COMPONENTS) == pytest.approx(loss_total, abs=1e-12), r
    if not BEHAVIOUR[executed["env"].name][1]:  # the head's dropout is off during this Keras's fit: no effect
        assert all(r["gap/dropout"] == 0.0 and r["gap_loss/dropout"] == 0.0 for r in rows)


@pytest.mark.slow
def test_the_clean_condition_equals_keras_evaluate(executed):
    """The last epoch's clean condition against Keras's own evaluate of the training split with the final
    weights; an accuracy may differ only by logits within rounding of the course's threshold (0.5)."""
    report = executed["report"]
    last, evaluated = report["rows"][-1], report["train_evaluate"]
    assert last["train_clean_loss"] == pytest.approx(evaluated["loss"], rel=RELATIVE)
    logits = report["train_logits"]
    borderline = sum(abs(z - 0.5) <= RELATIVE * (1 + abs(z)) for z in logits)
    count = len(logits)
    assert count == 320
    assert abs(round(last["train_clean_accuracy"] * count) - round(evaluated["accuracy"] * count)) <= borderline


@pytest.mark.slow
def test_csv_logger_summary_and_figure_come_out_of_the_notebook(executed):
    report, notebook = executed["report"], executed["notebook"]
    csv = pd.read_csv(executed["workdir"] / "history.csv")  # both phases: the second CSVLogger appends
    rows = pd.DataFrame(report["rows"])
    assert csv["epoch"].tolist() == list(range(2 * EPOCHS))
    for name in (*(f"gap/{c}" for c in COMPONENTS), "gap/total", "train_clean_accuracy", "val_accuracy_ci_low"):
        assert csv[name].tolist() == pytest.approx(rows[name].tolist(), rel=1e-6, abs=1e-12), name
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    summary = next(cell for cell in code if cell.source.strip() == "text = gap.summary()")
    assert _stream(summary) == report["summary"]
    assert f"phase 1, epoch {EPOCHS} " in report["summary"] and f"phase 2, epoch {2 * EPOCHS} " in report["summary"]
    figure = next(cell for cell in code if cell.source.strip() == "figure = gap.plot()")
    assert any("image/png" in o.get("data", {}) for o in figure.outputs)
    assert (executed["workdir"] / "alpaca_model.keras").is_file()
    print(f"{executed['env'].name}: {executed['seconds']:.1f} s", file=sys.stderr)

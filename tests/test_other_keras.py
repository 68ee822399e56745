"""The suite under other Kerases (tests/other_keras.py): the current one, the oldest pair pyproject.toml allows,
the next Keras (keras-nightly) and Keras 2 (tf-keras).

What changed after Keras 3.15 is measured by ``tests/keras_behaviour.py``, which imports nothing from the
suite: those tests document Keras's behaviour (docs/stack-facts.md V1, V2), they claim nothing about the
suite's code. The oldest pair runs the suite's own Keras-facing tests, and holds the versions pyproject.toml
names as its floor, installed as a learner's are (V3)."""

from __future__ import annotations

import json
import math
import re

import pytest
from packaging.version import Version

from .other_keras import BEHAVIOUR, KERAS_FAMILY, REPO, by_name, require, run_code, run_pytest, run_script


@pytest.mark.slow
def test_training_false_and_head_dropout_under_each_keras(keras_env):
    got = run_script(keras_env, REPO / "tests" / "keras_behaviour.py", timeout=300)
    print(keras_env.name, got)
    assert got["keras"].startswith(KERAS_FAMILY[keras_env.name]), got
    # Independent check of the inference side: Keras's evaluate equals the model's own call in inference mode
    # with the mean squared error computed by hand (float32 sums of 32 terms: relative error ~1e-6).
    assert got["inference_loss"] == pytest.approx(got["hand_inference_loss"], rel=1e-5)

    bn_kept, dropout_on = BEHAVIOUR[keras_env.name]
    if bn_kept:
        assert got["bn_moving_mean_change"] == 0.0, got
    else:  # momentum 0.5 and inputs of mean 5: one update moves the mean by units, not by rounding
        assert got["bn_moving_mean_change"] > 1e-3, got
    # With learning rate 0 and the BatchNorm frozen, fit's loss differs from the inference loss only through
    # dropout: a Dropout(0.9) that is on changes it by a large fraction; one that is off leaves float noise.
    relative = abs(got["fit_loss"] - got["inference_loss"]) / got["inference_loss"]
    if dropout_on:
        assert relative > 1e-2, got
    else:
        assert relative < 1e-5, got
    # Augmentation placed *before* the base stays on during fit under every Keras measured (V2).
    augmented = abs(got["augmented_fit_loss"] - got["augmented_inference_loss"]) / got["augmented_inference_loss"]
    assert augmented > 1e-2, got


COMPONENTS = ("lag", "batchnorm", "dropout", "augmentation", "split")
BN_LINE = "BatchNormalization layers of base are trainable"
DROPOUT_LINE = "a Dropout placed after a call given training=False is OFF during fit"
RELATIVE = 1e-5  # float32 passes over a one-convolution base: relative error ~1e-7, a margin of 100


def _lines(findings: list[dict], text: str) -> list[str]:
    return [f["severity"] for f in findings if text in f["message"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["oldest", "next", "keras2"])
def test_the_callback_and_the_check_on_the_course_model_under_each_keras(name):
    """tests/gap_under_keras.py: the course's model in miniature, both phases, with GapCallback and check, under
    each other Keras (the current one: tests/test_gap_callback.py, with hand-built passes). Compared with what
    that Keras did, measured without the suite: the base's own BatchNorm drift in the second fit, Keras's
    evaluate of the training split, the behaviour tests/keras_behaviour.py found (BEHAVIOUR), and the same
    training without the callback."""
    keras_env = require(by_name(name))
    got = run_script(keras_env, REPO / "tests" / "gap_under_keras.py", timeout=300)
    assert got["keras"].startswith(KERAS_FAMILY[keras_env.name]), got["keras"]
    bn_kept, dropout_on = BEHAVIOUR[keras_env.name]
    answers = (got["probe"]["training_false_keeps_bn_frozen"], got["probe"]["dropout_after_training_false_active"])
    assert answers == (bn_kept, dropout_on), got["probe"]
    if keras_env.name == "keras2":  # a tf-keras model: refused in one line each, the probe still answers
        (finding,) = got["check_before"]
        assert finding["severity"] == "problem" and "is a tf_keras model" in finding["message"], finding
        assert got["callback_refused"].startswith("PROBLEM: ") and "probe(tf.keras)" in got["callback_refused"]
        return

    # measuring changed nothing, and the model's own BatchNorm did what the check says this Keras does
    assert got["same_weights_without_the_callback"] is True
    assert got["bn_moving_mean_change"] == got["plain_bn_moving_mean_change"]
    assert (got["bn_moving_mean_change"] == 0.0) == bn_kept, got["bn_moving_mean_change"]
    assert _lines(got["check_unfrozen"], BN_LINE) == ["ok" if bn_kept else "problem"]
    for when in ("check_before", "check_unfrozen"):  # the head's Dropout(0.2) sits after base(x, training=False)
        assert _lines(got[when], DROPOUT_LINE) == ([] if dropout_on else ["problem"]), when
    assert _lines(got["check_unfrozen"], "the trainable set changed since the last compile") == ["problem"]
    assert _lines(got["check_before"], "thresholds them at 0.5") == ["problem"]

    rows = got["rows"]
    assert [(r["phase"], r["epoch"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (2, 3)]
    for r in rows:  # the components add up to Keras's own gap; the loss chain likewise
        assert r["gap/total"] == r["val_accuracy"] - r["accuracy"], r
        assert math.fsum(r[f"gap/{c}"] for c in COMPONENTS) == pytest.approx(r["gap/total"], abs=1e-12), r
        loss_total = r["val_loss"] - r["loss"]
        assert math.fsum(r[f"gap_loss/{c}"] for c in COMPONENTS) == pytest.approx(loss_total, abs=1e-12), r
        # a layer that is off during this Keras's fit has no effect to measure; one that is on has one
        if not dropout_on:
            assert r["gap/dropout"] == 0.0 and r["gap_loss/dropout"] == 0.0, r
        else:
            assert r["gap_loss/dropout"] != 0.0, r
    phase2 = rows[-1]
    assert (phase2["gap_loss/batchnorm"] == 0.0) == bn_kept, phase2
    # the clean condition against Keras's own evaluate of the training split, with the last epoch's weights;
    # an accuracy may differ only by logits within rounding of the metric's threshold (0.5: the course's)
    assert phase2["train_clean_loss"] == pytest.approx(got["evaluate"]["loss"], rel=RELATIVE)
    logits = got["train_logits"]
    borderline = sum(abs(z - 0.5) <= RELATIVE * (1 + abs(z)) for z in logits)
    count = len(logits)
    assert abs(round(phase2["train_clean_accuracy"] * count) - round(got["evaluate"]["accuracy"] * count)) <= borderline


# The Keras-facing tests the oldest pair must pass (docs/stack-facts.md V3): the pure ones of test_data_model
# (the split, the model, the logit accuracy that Keras < 3.5 refuses), a binary run measured end to end and a
# three-class run whose logged model is loaded back and checked by hand-built passes. `-k` matches markers too.
OLDEST_SELECTION = (
    "tests/test_data_model.py",
    "tests/test_core_run.py",
    "-k",
    "not slow or clearly_learned or more_than_two",
)


@pytest.mark.slow
def test_the_oldest_supported_pair_runs_the_suites_keras_tests():
    result = run_pytest(require(by_name("oldest")), *OLDEST_SELECTION)
    assert result["returncode"] == 0, result["output"]
    assert len(result["outcomes"]) >= 20 and set(result["outcomes"].values()) == {"passed"}, result["outcomes"]


def _floor(name: str) -> Version:
    """The lower bound pyproject.toml's dependency on ``name`` names, read from the file as text."""
    (bound,) = re.findall(rf'^\s*"{name}>=([\w.]+)[,"]', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    return Version(bound)


_INSTALLED = """
import json, sys, finetune_ablation, tensorflow, keras
from finetune_ablation.fingerprints import installed
from finetune_ablation.gap import GapCallback, check
print(json.dumps({"suite": finetune_ablation.__file__, "tensorflow": tensorflow.__version__,
                  "keras": keras.__version__, "keras_distribution": installed("keras"),
                  "gap": [sys.modules[f.__module__].__file__ for f in (GapCallback, check)]}))
"""


@pytest.mark.slow
def test_a_plain_install_keeps_the_oldest_pair_at_pyprojects_floor():
    """The oldest venv got TensorFlow and Keras first, then `pip install .` (non-editable, with the constraint
    docs/stack-facts.md V4 gives for TensorFlow < 2.18): pip kept them, and they are pyproject.toml's floors."""
    got = run_code(require(by_name("oldest")), _INSTALLED, installed=True)
    assert "site-packages" in got["suite"], got  # the installed copy, not the working tree
    assert got["keras_distribution"] == ["keras", got["keras"]], got
    for name in ("tensorflow", "keras"):
        assert Version(got[name]).release[:2] == _floor(name).release[:2], (name, got, str(_floor(name)))


@pytest.mark.slow
def test_a_non_editable_install_imports_in_a_fresh_venv():
    """keras-next is a fresh venv with a plain `pip install .`: the suite, `GapCallback` and `check` import
    from its site-packages."""
    got = run_code(require(by_name("next")), _INSTALLED, installed=True)
    assert "site-packages" in got["suite"] and ".dev" in got["keras"], json.dumps(got)
    # the notebook's two names come from that installed copy too (tests/test_notebook.py runs the whole
    # notebook from it, and from the oldest venv's)
    assert all(path.startswith(got["suite"].removesuffix("__init__.py")) for path in got["gap"]), got["gap"]
    # what the suite records as the Keras version (version.keras, the logged model's requirements): the
    # distribution that provides the module, as Keras itself reports its version
    assert got["keras_distribution"] == ["keras-nightly", got["keras"]], got


@pytest.mark.slow
def test_a_run_logs_and_reloads_its_model_under_the_next_keras():
    """keras-nightly provides the ``keras`` module under another distribution name; a run that logs its model
    pins the distributions it finds (a run crashed there once: no ``keras`` distribution). The test's run is
    the three-class run whose logged model is loaded back and checked by hand-built passes."""
    result = run_pytest(require(by_name("next")), "tests/test_core_run.py", "-k", "more_than_two")
    assert result["returncode"] == 0, result["output"]
    assert list(result["outcomes"].values()) == ["passed"], result["outcomes"]

"""The suite under other Kerases (tests/other_keras.py): the current one, the oldest pair pyproject.toml allows,
the next Keras (keras-nightly) and Keras 2 (tf-keras).

What changed after Keras 3.15 is measured by ``tests/keras_behaviour.py``, which imports nothing from the
suite: those tests document Keras's behaviour (docs/stack-facts.md V1, V2), they claim nothing about the
suite's code. The oldest pair runs the suite's own Keras-facing tests, and holds the versions pyproject.toml
names as its floor, installed as a learner's are (V3)."""

from __future__ import annotations

import json
import re

import pytest
from packaging.version import Version

from .other_keras import REPO, by_name, require, run_code, run_pytest, run_script

# Per env: (an unfrozen BatchNorm inside `base(x, training=False)` keeps its moving mean during fit,
#           a Dropout placed after the base is active during fit); measured, docs/stack-facts.md V1 and V2
EXPECTED = {
    "current": (False, True),  # Keras 3.15: fit's training=True reaches the BatchNorm; head dropout on
    "oldest": (False, True),  # Keras 3.5: the same
    "next": (True, False),  # keras-nightly 3.16.0.dev: the call's training=False wins, and reaches the head too
    "keras2": (True, True),  # tf-keras 2.21: the call's flag wins inside the base only
}
KERAS_FAMILY = {"current": "3.", "oldest": "3.", "next": "3.16.0.dev", "keras2": "2."}


@pytest.mark.slow
def test_training_false_and_head_dropout_under_each_keras(keras_env):
    got = run_script(keras_env, REPO / "tests" / "keras_behaviour.py", timeout=300)
    print(keras_env.name, got)
    assert got["keras"].startswith(KERAS_FAMILY[keras_env.name]), got
    # Independent check of the inference side: Keras's evaluate equals the model's own call in inference mode
    # with the mean squared error computed by hand (float32 sums of 32 terms: relative error ~1e-6).
    assert got["inference_loss"] == pytest.approx(got["hand_inference_loss"], rel=1e-5)

    bn_kept, dropout_on = EXPECTED[keras_env.name]
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
import json, finetune_ablation, tensorflow, keras
from finetune_ablation.fingerprints import installed
print(json.dumps({"suite": finetune_ablation.__file__, "tensorflow": tensorflow.__version__,
                  "keras": keras.__version__, "keras_distribution": installed("keras")}))
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
    """keras-next is a fresh venv with a plain `pip install .`: the suite imports from its site-packages."""
    got = run_code(require(by_name("next")), _INSTALLED, installed=True)
    assert "site-packages" in got["suite"] and ".dev" in got["keras"], json.dumps(got)
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

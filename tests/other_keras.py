"""Run code under another Keras: a script, a snippet or a pytest selection, in one of the extra virtualenvs
that ``.ci/keras-venvs`` makes, as a subprocess whose answer comes back as JSON.

The suite's own virtualenv holds the Keras that CI pins (``.ci/tested-versions.txt``). Learners have others
(docs/stack-facts.md, "Other Kerases"), so ``.ci/run`` also makes, under ``.venvs/`` (or the folder named by
``FINETUNE_ABLATION_KERAS_VENVS``):

- ``keras-next``: TensorFlow 2.21 with the pinned ``keras-nightly`` (the next Keras), and tf-keras 2.21
  (Keras 2): ``tf_keras`` is a module of its own, so one venv holds both, and ``TF_USE_LEGACY_KERAS=1``
  picks Keras 2;
- ``keras-oldest``: the oldest TensorFlow + Keras pair ``pyproject.toml`` allows.

Each holds the project installed non-editable, as a learner installs it; the subprocess gets ``src/`` first
on ``PYTHONPATH`` so it runs the working tree's code. A test that needs an absent venv skips and says how to
make it; ``FINETUNE_ABLATION_KERAS_VENVS_REQUIRED=1`` (set by ``.ci/run``) turns that skip into a failure, so
CI cannot pass by skipping. Use it through the ``keras_env`` fixture (``conftest.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENVS_VAR = "FINETUNE_ABLATION_KERAS_VENVS"
REQUIRED_VAR = "FINETUNE_ABLATION_KERAS_VENVS_REQUIRED"
INSIDE_VAR = "FINETUNE_ABLATION_KERAS_ENV"  # set in every subprocess: the name of the env it runs in
COMPLETE = ".complete"  # written by .ci/keras-venvs as a venv's last step: a half-made venv counts as absent


def venvs_dir() -> Path:
    return Path(os.environ.get(VENVS_VAR) or REPO / ".venvs")


@dataclass(frozen=True)
class KerasEnv:
    """One Keras to run code under: a virtualenv (None: the suite's own interpreter) and extra variables."""

    name: str
    venv: str | None
    what: str
    variables: Mapping[str, str] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return Path(sys.executable) if self.venv is None else venvs_dir() / self.venv / "bin" / "python"

    def missing(self) -> str | None:
        """Why this env cannot run here, or None."""
        if self.venv is None:
            return None
        folder = venvs_dir() / self.venv
        if not (folder / COMPLETE).is_file():
            state = "is incomplete" if folder.exists() else "does not exist"
            return (
                f"{self.what}: virtualenv {folder} {state}; make it with `bash .ci/keras-venvs {self.venv}` "
                f"(.ci/run does), or point {VENVS_VAR} at the folder holding it"
            )
        return None


KERAS_ENVS = (
    KerasEnv("current", None, "the Keras of the suite's own virtualenv"),
    KerasEnv("next", "keras-next", "keras-nightly, the next Keras, on TensorFlow 2.21"),
    KerasEnv("keras2", "keras-next", "tf-keras 2.21 (Keras 2) on TensorFlow 2.21", {"TF_USE_LEGACY_KERAS": "1"}),
    KerasEnv("oldest", "keras-oldest", "the oldest TensorFlow + Keras pair pyproject.toml allows"),
)


# Per env, what Keras does with a base called as `base(x, training=False)` inside the outer model: (an unfrozen
# BatchNorm in it keeps its moving mean during fit, a Dropout placed after the base is active during fit).
# Measured by tests/keras_behaviour.py, which imports nothing from the suite (docs/stack-facts.md V1, V2).
BEHAVIOUR = {
    "current": (False, True),  # Keras 3.15: fit's training=True reaches the BatchNorm; head dropout on
    "oldest": (False, True),  # Keras 3.5: the same
    "next": (True, False),  # keras-nightly 3.16.0.dev: the call's training=False wins, and reaches the head too
    "keras2": (True, True),  # tf-keras 2.21: the call's flag wins inside the base only
}
KERAS_FAMILY = {"current": "3.", "oldest": "3.", "next": "3.16.0.dev", "keras2": "2."}


def by_name(name: str) -> KerasEnv:
    return next(env for env in KERAS_ENVS if env.name == name)


def require(env: KerasEnv) -> KerasEnv:
    """``env`` if it can run here; else skip the test (fail it when CI requires every env)."""
    if os.environ.get(INSIDE_VAR):
        pytest.skip(f"already inside the {os.environ[INSIDE_VAR]!r} Keras env: no env is started from another")
    reason = env.missing()
    if reason is not None:
        if os.environ.get(REQUIRED_VAR) == "1":
            pytest.fail(f"{reason} ({REQUIRED_VAR}=1)")
        pytest.skip(reason)
    return env


def _environment(env: KerasEnv) -> dict[str, str]:
    """The parent's environment, less what belongs to this process (its venv, pytest's own variables), plus
    the env's variables, the working tree's ``src/`` first on the path, and the env's name."""
    skip = {"VIRTUAL_ENV", "PYTHONHOME", "TF_USE_LEGACY_KERAS", "PYTEST_ADDOPTS"}
    out = {k: v for k, v in os.environ.items() if k not in skip and not k.startswith("PYTEST_")}
    path = [str(REPO / "src"), *filter(None, out.get("PYTHONPATH", "").split(os.pathsep))]
    out.update(PYTHONPATH=os.pathsep.join(path), TF_CPP_MIN_LOG_LEVEL="3", **{INSIDE_VAR: env.name})
    out.update(env.variables)
    return out


def run(env: KerasEnv, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``env``, from the repository's root."""
    return subprocess.run(
        [str(env.python), *args], cwd=REPO, env=_environment(env), capture_output=True, text=True, timeout=timeout
    )


def _json_of(env: KerasEnv, done: subprocess.CompletedProcess) -> dict:
    """The last line of stdout as JSON; a failed or silent subprocess fails the test with its stderr's tail."""
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        pytest.fail(f"under {env.name} ({env.python}) exit {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_script(env: KerasEnv, script: Path | str, *args: str, timeout: float = 600) -> dict:
    """Run a script that prints one JSON object as its last line; return that object."""
    return _json_of(env, run(env, str(script), *args, timeout=timeout))


def run_code(env: KerasEnv, code: str, timeout: float = 600, installed: bool = False) -> dict:
    """Run a snippet that prints one JSON object as its last line; return that object. ``installed`` runs it
    in Python's isolated mode (``-I``: no ``PYTHONPATH``, no working directory on the path), so it sees the
    project as installed in the env, not the working tree."""
    return _json_of(env, run(env, *(["-I"] if installed else []), "-c", code, timeout=timeout))


def versions(env: KerasEnv) -> dict:
    """The TensorFlow and Keras that code in ``env`` gets (Keras 2's ``tf_keras`` where the env selects it)."""
    return run_code(env, _VERSIONS)


_VERSIONS = """
import json, os, tensorflow as tf
if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    import tf_keras as keras
else:
    import keras
print(json.dumps({"tensorflow": tf.__version__, "keras": keras.__version__}))
"""


def run_pytest(env: KerasEnv, *args: str, timeout: float = 1200) -> dict:
    """A pytest selection in ``env`` (serially unless ``args`` say ``-n``): its exit code, each test's outcome
    by node id (from pytest's own JUnit XML report) and the output's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        done = run(env, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", f"--junitxml={report}", *args,
                   timeout=timeout)  # fmt: skip
        outcomes = _outcomes(report) if report.is_file() else {}
    return {"returncode": done.returncode, "outcomes": outcomes, "output": done.stdout[-3000:] + done.stderr[-2000:]}


def _outcomes(report: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        node = module.replace(".", "/") + ".py::" + name
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[node] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes

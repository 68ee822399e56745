"""What a person reads in the terminal: no start-up chatter, one short line per epoch, and where to look
at the end. The full metric set stays in MLflow and ``history.csv``; ``train.verbose=1|2`` adds Keras's
own progress bar or metric line."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
import tempfile
from importlib import metadata
from urllib.parse import urlsplit, urlunsplit

from . import record as rec
from .errors import UserError

# Lines TensorFlow/XLA print on a CPU-only machine before (or regardless of) any log level: noise, not news.
_CHATTER = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|cudart_stub\.cc|cuda_platform\.cc.*cuInit|"
    r"cuda_(executor|diagnostics|dnn|fft|blas)\.cc|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|oneDNN custom operations are on|"
    r"This TensorFlow binary is optimized to use available CPU instructions|"
    r"rebuild TensorFlow with the appropriate compiler flags"
)
_started = False


@contextlib.contextmanager
def _filtered_stderr():
    """Send file descriptor 2 (where C++ logs go) to a temp file, then replay all but the chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not _CHATTER.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def quiet_startup() -> None:
    """Import TensorFlow and start its CPU runtime without the CUDA/absl start-up lines; TF's own
    warnings and errors, and every Python warning, still show. Call before anything imports TF."""
    global _started
    if _started:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING off, errors on
    with _filtered_stderr():
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe (cuInit) happens here, inside the filter
        except Exception as exc:  # a missing or broken install: any error, from Python or the native runtime
            raise UserError(_tensorflow_unusable(exc)) from exc
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # absl's Python INFO/WARNING lines from TF internals
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _started = True


def _tensorflow_unusable(exc: BaseException) -> str:
    """The line for a TensorFlow that cannot be imported: its root cause (TensorFlow wraps a native
    runtime's failure in an ImportError of a dozen lines) and the reinstall that fixes it."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    cause = f"{type(root).__name__}: {first}" if first else type(root).__name__
    try:
        requirements = metadata.requires("finetune-ablation") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requirements = []
    pin = next((r for r in requirements if r.startswith("tensorflow")), "tensorflow")
    reinstall = f"{shlex.quote(sys.executable)} -m pip install --force-reinstall {shlex.quote(pin)}"
    return f"TensorFlow cannot be imported ({cause}): reinstall it in this environment: {reinstall}"


def points(value: float, signed: bool = True) -> str:
    """An accuracy fraction in points, one decimal, as every page of the suite writes it. A difference that
    rounds to zero is 0.0, never -0.0 (two equal accuracies subtract to -1e-9 in float32)."""
    rounded = round(100 * value, 1) + 0.0  # -0.0 + 0.0 == 0.0
    return f"{rounded:+.1f}" if signed else f"{rounded:.1f}"


def gap_leader(total: float) -> str:
    """Who leads, by the sign of a gap (validation - training accuracy) as ``points`` prints it: a total
    that rounds to 0.0 is "level", not "validation beats training by 0.0"."""
    rounded = round(100 * total, 1)
    if rounded != rounded:
        return "not measured"
    if rounded == 0:
        return "level"
    return "validation beats training" if rounded > 0 else "training beats validation"


def epoch_line(phase: int, epoch: int, epochs: int, logs: dict[str, float]) -> str:
    """One line: phase, epoch, loss, accuracy, val_accuracy (95% interval), gap and its largest cause."""
    parts = [f"phase {phase}  epoch {epoch + 1:>2}/{epochs}"]
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.3f}")
    if "accuracy" in logs:
        parts.append(f"accuracy {logs['accuracy']:.3f}")
    if "val_accuracy" in logs:
        val = f"val_accuracy {logs['val_accuracy']:.3f}"
        low, high = rec.interval_metrics(rec.VAL_ACCURACY)
        if low in logs:
            val += f" [{logs[low]:.2f}, {logs[high]:.2f}]"
        parts.append(val)
    if rec.GAP_TOTAL in logs:
        components = [c for c in rec.GAP_COMPONENTS if rec.gap_metric(c) in logs]
        gap = f"gap {points(logs[rec.GAP_TOTAL])} pts"
        if components:
            largest = max(components, key=lambda c: abs(logs[rec.gap_metric(c)]))
            gap += f" (largest: {largest} {points(logs[rec.gap_metric(largest)])})"
        parts.append(gap)
    return "  ".join(parts)


def print_epoch(phase: int, epoch: int, epochs: int, logs: dict[str, float], note: str = "") -> None:
    """The epoch's line; ``note`` says where it came from when it was not trained now (the phase-1 cache)."""
    print(epoch_line(phase, epoch, epochs, logs) + (f"  ({note})" if note else ""), flush=True)


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def where_to_look(uri: str, experiment_id: str, run_id: str, what: str = "run") -> str:
    """The run id, how to open MLflow's UI on this store, and the URL of the run's page."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow {what} {run_id}\n  open {uri.rstrip('/')}/{path}"
    return (
        f"MLflow {what} {run_id}\n"
        f"  see it:  mlflow ui --backend-store-uri {shlex.quote(_without_password(uri))}\n"
        f"  then open http://127.0.0.1:5000/{path}"
    )


def print_where_to_look(uri: str, experiment_id: str, run_id: str, what: str = "run") -> None:
    print(where_to_look(uri, experiment_id, run_id, what), flush=True)

"""A liveness signal on every run the suite opens, and a clean end for runs open when a process stops.

MLflow has no liveness check: a process killed outright (SIGKILL, out of memory, a closed laptop)
leaves its run RUNNING forever (docs/stack-facts.md). So each run carries tags naming its process
(host, pid namespace, pid, process start time) and a heartbeat timestamp that a daemon thread refreshes
every ``HEARTBEAT_INTERVAL_S``. ``reaper`` reads them back to mark runs whose process is gone KILLED.

A process that stops on an exception, Ctrl-C or SIGTERM ends the runs it still holds open itself
(``ending_open_runs``): KILLED for an interrupt, FAILED otherwise, with the reason as the ``error`` tag."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import psutil

from .record import (
    ERROR_TAG,
    HEARTBEAT_INTERVAL_TAG,
    HEARTBEAT_TAG,
    HOST_TAG,
    MAX_TAG_LENGTH,
    PID_NAMESPACE_TAG,
    PID_TAG,
    PROCESS_START_TAG,
    SLURM_CLUSTER_TAG,
    SLURM_JOB_TAG,
)

log = logging.getLogger("finetune_ablation")


HEARTBEAT_INTERVAL_S = float(os.environ.get("ABLATE_HEARTBEAT_INTERVAL_S", "30"))


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def pid_namespace() -> str:
    """Which pid namespace this process lives in: two containers may share a host name, not this."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch); None when no live process has that pid.
    Raises ``psutil.AccessDenied`` when the process exists but cannot be inspected (so it lives)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # dead, only waiting for its parent to reap it
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, ValueError):
        return None


def slurm_job_tags() -> dict[str, str]:
    """In a SLURM job: its id as ``squeue``/``scancel`` and submitit's log folders name it (``<array
    job>_<task>`` for an array task, as the submitit launcher submits) and its cluster."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return {}
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    tags = {SLURM_JOB_TAG: f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]}
    if env.get("SLURM_CLUSTER_NAME"):
        tags[SLURM_CLUSTER_TAG] = env["SLURM_CLUSTER_NAME"]
    return tags


def process_tags() -> dict[str, str]:
    """The tags that name this process, given to a run when it is created (so no run lacks them)."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_NAMESPACE_TAG: pid_namespace(),
        PID_TAG: str(os.getpid()),
        PROCESS_START_TAG: f"{process_start(os.getpid()):.2f}",
        HEARTBEAT_TAG: format_time(now_utc()),
        HEARTBEAT_INTERVAL_TAG: f"{HEARTBEAT_INTERVAL_S:g}",
        **slurm_job_tags(),
    }


# -- the heartbeat -----------------------------------------------------------------------------------


@dataclass
class _OpenRun:
    uri: str
    on_abort: Callable[[str], None] | None  # ends the run with this status when the process stops early


_lock = threading.Lock()
_open: dict[str, _OpenRun] = {}
_thread: threading.Thread | None = None


def start(uri: str, run_id: str, on_abort: Callable[[str], None] | None = None) -> None:
    """Refresh ``run_id``'s heartbeat from now on, and end it (``on_abort(status)``, else a plain
    KILLED/FAILED) if this process stops on an exception or interrupt before ``stop``."""
    global _thread
    with _lock:
        _open[run_id] = _OpenRun(uri, on_abort)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_beat_forever, name="mlflow-heartbeat", daemon=True)
            _thread.start()


def stop(run_id: str) -> None:
    """The run ends normally: no more heartbeats, nothing to end at exit."""
    with _lock:
        _open.pop(run_id, None)


@contextlib.contextmanager
def heartbeat(uri: str, run_id: str) -> Iterator[None]:
    """``start`` for the body of a ``with``; the caller ends the run itself."""
    start(uri, run_id)
    try:
        yield
    finally:
        stop(run_id)


def _beat_forever() -> None:
    import mlflow

    while True:
        time.sleep(HEARTBEAT_INTERVAL_S)
        with _lock:
            beating = list(_open.items())
        for run_id, run in beating:
            try:
                mlflow.MlflowClient(run.uri).set_tag(run_id, HEARTBEAT_TAG, format_time(now_utc()))
            except Exception as exc:  # a busy store: the next beat tries again, well within the timeout
                log.debug("heartbeat of MLflow run %s failed: %s", run_id, exc)


def _forget_after_fork() -> None:
    global _thread
    _open.clear()  # the parent owns these runs; a forked child holds none
    _thread = None


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_forget_after_fork)


# -- ending the runs a stopping process still holds ----------------------------------------------------


def _reason(exc: BaseException) -> str:
    """One line on why the process stopped. Hydra reports an exception and calls ``sys.exit(1)``
    while handling it, so the real cause of a SystemExit is its ``__context__``."""
    if isinstance(exc, SystemExit) and exc.__context__ is not None:
        exc = exc.__context__
    while exc.__cause__ is not None:  # Hydra wraps a sweeper's own error in InstantiationException
        exc = exc.__cause__
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted ({exc.args[0] if exc.args else 'Ctrl-C'})"
    if isinstance(exc, SystemExit):
        return f"the process exited with code {exc.code}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()[:MAX_TAG_LENGTH]


def end_open_runs(exc: BaseException | None) -> list[str]:
    """End every run this process still holds open: KILLED after an interrupt, FAILED otherwise, with
    the reason as the ``error`` tag. Returns their ids. Never raises: the original error matters more."""
    with _lock:
        runs = list(_open.items())
        _open.clear()
    if not runs:  # e.g. a config Hydra cannot compose: its error line need not wait for MLflow's import
        return []
    import mlflow

    interrupted = isinstance(exc, KeyboardInterrupt) or isinstance(getattr(exc, "__context__", None), KeyboardInterrupt)
    status = "KILLED" if interrupted else "FAILED"
    reason = _reason(exc) if exc is not None else "the process exited with the run still open"
    for run_id, run in runs:
        client = mlflow.MlflowClient(run.uri)
        with contextlib.suppress(Exception):
            client.set_tag(run_id, ERROR_TAG, reason)
        try:
            if run.on_abort is not None:
                run.on_abort(status)  # e.g. the sweep's parent: its summary so far, then this status
            if client.get_run(run_id).info.status != status:
                client.set_terminated(run_id, status)
        except Exception as error:
            log.warning("could not end MLflow run %s as %s: %s", run_id, status, error)
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status)
        log.error("MLflow run %s ended %s: %s", run_id, status, reason)
    return [run_id for run_id, _ in runs]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def ending_open_runs() -> Iterator[None]:
    """Around a whole command: SIGTERM stops it like Ctrl-C (so batch schedulers' kills are recorded),
    and any exception, interrupt or exit ends the runs still open before it propagates."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        yield
    except BaseException as exc:
        end_open_runs(exc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


atexit.register(lambda: end_open_runs(None) if _open else None)

"""Mark KILLED the RUNNING runs whose process is gone (MLflow itself never does, docs/stack-facts.md).

Every ``ablate`` and ``ablate-report`` calls ``reap_once`` when it opens a store. A run is judged by the
liveness tags its process gave it (``liveness``):
- same host and pid namespace: dead when no live process has its pid, or the pid now belongs to a
  process that started at another time (the pid was reused). This is exact, so it acts at once.
- another host (or container), in a SLURM job (``liveness.slurm_job``) of the cluster this machine's
  ``squeue`` serves: dead as soon as SLURM says the job ended (the login node of a cluster cannot see a
  compute node's processes, but the controller knows its jobs).
- another host otherwise: dead when its heartbeat is older than ``STALE_AFTER_S`` (and at least ten of
  its own heartbeat intervals). Clocks of the two hosts are compared, so the limit is generous.
A run without liveness tags (made by another tool, or before the suite had them) is left alone, and so
is every run whose process lives. A reaped run gets the reason as tags and its last heartbeat as end time."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from datetime import datetime

import mlflow
import psutil
from mlflow.entities import Run, ViewType

from . import liveness
from .record import REAPED_BY_TAG, REAPED_TAG, SLURM_CLUSTER_TAG, SLURM_JOB_TAG

log = logging.getLogger("finetune_ablation")

STALE_AFTER_S = float(os.environ.get("ABLATE_STALE_AFTER_S", "900"))
START_TOLERANCE_S = 1.0  # process start times are read from /proc at jiffy resolution
_reaped_stores: set[str] = set()


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


# squeue's states of a job whose processes are gone (a PENDING, RUNNING, COMPLETING, SUSPENDED... job may live)
SLURM_ENDED_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
_SLURM_TIMEOUT_S = 15


@functools.cache
def _slurm_cluster_here(slurm_conf: str | None) -> str | None:
    """The ClusterName of the SLURM controller this machine's commands talk to (None: no SLURM here),
    once per config file (``$SLURM_CONF``, else SLURM's default)."""
    if shutil.which("scontrol") is None or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=_SLURM_TIMEOUT_S
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip() or None
    return None


def slurm_job_ended(job: str, cluster: str | None) -> str | None:
    """Why SLURM says ``job`` of ``cluster`` has ended; None while it may run, or when this machine's
    SLURM is another cluster or does not answer (then the heartbeat decides)."""
    if not job or cluster is None or _slurm_cluster_here(os.environ.get("SLURM_CONF")) != cluster:
        return None
    try:
        query = ["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"]
        found = subprocess.run(query, capture_output=True, text=True, timeout=_SLURM_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0:
        # the controller forgets a job MinJobAge after its end; any other error says nothing
        return f"SLURM job {job} has ended (squeue no longer knows it)" if "Invalid job id" in found.stderr else None
    states = found.stdout.split()
    if states and all(state in SLURM_ENDED_STATES for state in states):
        return f"SLURM job {job} is {states[0]}"
    return None


def death_reason(tags: Mapping[str, str], now: datetime | None = None) -> str | None:
    """Why the process of a RUNNING run with these tags is gone; None while it may live or unknown."""
    pid_text = tags.get(liveness.PID_TAG, "")
    if not pid_text.isdigit():
        return None  # no liveness signal: nothing to judge by
    pid, host = int(pid_text), tags.get(liveness.HOST_TAG, "?")
    same_machine = host == socket.gethostname() and tags.get(liveness.PID_NAMESPACE_TAG) == liveness.pid_namespace()
    if same_machine:
        try:
            started = liveness.process_start(pid)
        except psutil.AccessDenied:
            return None  # another user's process: it exists, so the run lives
        if started is None:
            return f"process {pid} on {host} is gone"
        try:
            recorded = float(tags.get(liveness.PROCESS_START_TAG, ""))
        except ValueError:
            return None
        if abs(started - recorded) > START_TOLERANCE_S:
            return f"pid {pid} on {host} now belongs to another process (the run's process is gone)"
        return None
    ended = slurm_job_ended(tags.get(SLURM_JOB_TAG, ""), tags.get(SLURM_CLUSTER_TAG))
    if ended is not None:
        return f"{ended} (process {pid} on {host})"
    beat = _parse_time(tags.get(liveness.HEARTBEAT_TAG))
    if beat is None:
        return None
    try:
        interval = float(tags.get(liveness.HEARTBEAT_INTERVAL_TAG, ""))
    except ValueError:
        interval = liveness.HEARTBEAT_INTERVAL_S
    limit = max(STALE_AFTER_S, 10 * interval)
    age = ((now or liveness.now_utc()) - beat).total_seconds()
    if age > limit:
        return f"no heartbeat from process {pid} on {host} for {age:.0f} s (limit {limit:.0f} s)"
    return None


def running_runs(client: mlflow.MlflowClient) -> list[Run]:
    """Every RUNNING run in the store's active experiments."""
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50000)]
    found: list[Run] = []
    for start in range(0, len(ids), 100):  # MLflow caps the experiments of one search
        token = None
        while True:
            page = client.search_runs(
                ids[start : start + 100], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
            )
            found.extend(page)
            token = page.token
            if not token:
                break
    return found


def reap(client: mlflow.MlflowClient, now: datetime | None = None) -> dict[str, str]:
    """Mark KILLED every RUNNING run whose process is gone; returns {run id: reason}."""
    now = now or liveness.now_utc()
    reaped: dict[str, str] = {}
    for run in running_runs(client):
        reason = death_reason(run.data.tags, now)
        if reason is None:
            continue
        run_id = run.info.run_id
        beat = _parse_time(run.data.tags.get(liveness.HEARTBEAT_TAG)) or now
        client.set_tag(run_id, REAPED_TAG, reason)
        by = f"pid {os.getpid()} on {socket.gethostname()} at {liveness.format_time(now)}"
        client.set_tag(run_id, REAPED_BY_TAG, by)
        if not run.data.tags.get(liveness.ERROR_TAG):
            client.set_tag(run_id, liveness.ERROR_TAG, f"killed: {reason}")
        client.set_terminated(run_id, "KILLED", end_time=int(beat.timestamp() * 1000))
        log.warning("MLflow run %s (%s) was RUNNING but %s: marked KILLED", run_id, run.info.run_name, reason)
        reaped[run_id] = reason
    return reaped


def reap_once(client: mlflow.MlflowClient, uri: str) -> dict[str, str]:
    """``reap`` the store at ``uri`` the first time this process opens it; a failure only warns (a
    read-only store must not stop a report)."""
    if uri in _reaped_stores:
        return {}
    _reaped_stores.add(uri)
    try:
        return reap(client)
    except Exception as exc:
        log.warning("could not check the store %s for dead runs: %s", uri, exc)
        return {}

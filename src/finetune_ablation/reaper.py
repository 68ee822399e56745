"""Mark KILLED the RUNNING runs whose process is gone (MLflow itself never does, docs/stack-facts.md).

Every ``ablate`` and ``ablate-report`` calls ``reap_once`` when it opens a store. A run is judged by the
liveness tags its process gave it (``liveness``):
- same host and pid namespace: dead when no live process has its pid, or the pid now belongs to a
  process that started at another time (the pid was reused). This is exact, so it acts at once.
- another host (or container): dead when its heartbeat is older than ``STALE_AFTER_S`` (and at least
  ten of its own heartbeat intervals). Clocks of the two hosts are compared, so the limit is generous.
A run without liveness tags (made by another tool, or before the suite had them) is left alone, and so
is every run whose process lives. A reaped run gets the reason as tags and its last heartbeat as end time."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from datetime import datetime

import mlflow
import psutil
from mlflow.entities import Run, ViewType

from . import liveness
from .record import REAPED_BY_TAG, REAPED_TAG

log = logging.getLogger("finetune_ablation")

STALE_AFTER_S = float(os.environ.get("ABLATE_STALE_AFTER_S", "900"))
START_TOLERANCE_S = 1.0  # process start times are read from /proc at jiffy resolution
_reaped_stores: set[str] = set()


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
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

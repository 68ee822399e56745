"""A launcher's job that ended without a result, as the one line ``ablate -m`` prints.

Hydra's submitit launcher (``hydra/launcher=submitit_slurm``) raises ``UncompletedJobError`` when a SLURM
job ends without writing its result: cancelled (``scancel``), past its time limit, killed for memory,
or on a failed node. That is a fault of the cluster or the user, not a bug: the sweep's parent run has
already been ended FAILED with its summary so far, the job's own run is marked KILLED by the next
``ablate`` (reaper.py), and the same command again trains exactly the missing jobs (resume), so the user
needs that line, not submitit's traceback (docs/scaling-out.md, "SLURM")."""

from __future__ import annotations

import re

_STATE = re.compile(r"\(state: ([A-Z_]+)\)")


def lost_job_line(exc: BaseException) -> str | None:
    """The line for a launcher's job that ended without a result; None for any other error."""
    kind = type(exc)
    if kind.__name__ != "UncompletedJobError" or not kind.__module__.startswith("submitit"):
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else "a job"
    job = first.split(" with path ")[0]  # "Job 4711_3 (task: 0)"
    state = _STATE.search(text)
    how = f"ended {state.group(1)}" if state else "ended"
    return (
        f"SLURM {job[0].lower()}{job[1:]} {how} without a result: the sweep's parent run is FAILED, and the "
        "job's run is marked KILLED by the next ablate; run the same command again to train the missing jobs "
        "(the finished ones are reused)"
    )

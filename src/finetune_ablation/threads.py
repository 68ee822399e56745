"""How many threads TensorFlow uses in one job, decided from what the engine granted the job.

The thread count changes the last float bits of a run (TensorFlow splits its reductions over its
intra-op pool; docs/stack-facts.md T2), so it is part of the run record: ``threads`` holds the count
the job really used (logged in its config and params, with the tag ``threads.granted_by`` saying where
it came from), the phase-1 cache keys on it, and ``ablate-reproduce`` runs with it. It is not part of
resume's config hash nor a report factor (``config.Role.execution``): runs that differ only in it
compute the same thing to float tolerance, the same replicate.

The count, unless ``threads`` sets it: the CPUs the engine granted this process (``SLURM_CPUS_PER_TASK``
in a SLURM job, Ray's ``num_cpus`` in a Ray task, else the cores this process may run on), divided
among the jobs the launcher runs at once in it (the joblib launcher's ``n_jobs``; one otherwise).
Nothing here imports TensorFlow unless it already runs in this process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Grant:
    """The thread count of one job and, in words, what decided it (the ``threads.granted_by`` tag)."""

    threads: int
    granted_by: str


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a ``taskset`` or cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def slurm_cpus(env: Mapping[str, str]) -> tuple[int, str] | None:
    """The CPUs of this SLURM job's task: ``SLURM_CPUS_PER_TASK`` (set when the job asked for
    ``--cpus-per-task``), else ``SLURM_CPUS_ON_NODE`` (what the node gave the job); None outside SLURM."""
    if not env.get("SLURM_JOB_ID"):
        return None
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"{name}={value}"
    return None


def ray_cpus() -> tuple[int, str] | None:
    """The CPUs Ray assigned the task running this job (``num_cpus``); None outside a Ray task. Ray is
    only asked when a launcher already imported it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver, or a Ray without this API: no task's grant to read
        return None
    if not cpus:
        return None
    return max(1, int(cpus)), f"Ray num_cpus={cpus:g}"


def granted(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The CPUs this process was granted, and by whom."""
    env = os.environ if env is None else env
    found = slurm_cpus(env) or ray_cpus()
    if found is not None:
        return found
    count = cores()
    return count, f"{count} cores"


def decide(threads: int | None, parallel_jobs: int, launcher: str = "") -> Grant:
    """``threads`` when set; else the granted CPUs divided among ``parallel_jobs`` (at least one)."""
    if threads:
        return Grant(int(threads), f"threads={threads} (config)")
    cpus, source = granted()
    if parallel_jobs <= 1:
        return Grant(cpus, source)
    share = max(1, cpus // parallel_jobs)
    return Grant(share, f"{source} / {parallel_jobs} parallel jobs ({launcher or 'launcher'} n_jobs)")


def apply(threads: int) -> int:
    """Size TensorFlow's intra- and inter-op pools to ``threads``; return the intra-op count TensorFlow
    really has. Pools are fixed when TensorFlow's runtime starts: in a process where it already runs (a
    launcher's reused worker, a caller's own process), the earlier size stays and is what is returned."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime already started in this process
        pass
    return tf.config.threading.get_intra_op_parallelism_threads() or cores()


def settle(grant: Grant) -> Grant:
    """The grant as this process can honour it: when TensorFlow already runs here with other pools, the
    count it really uses (so the logged count is always the one that computed)."""
    if "tensorflow" not in sys.modules:
        return grant  # TensorFlow starts later, in this job, with exactly these pools
    real = apply(grant.threads)
    if real == grant.threads:
        return grant
    wanted = f"{grant.threads} from {grant.granted_by}"
    return Grant(real, f"{real}: TensorFlow already ran in this process with {real} (wanted {wanted})")


def with_threads(cfg: DictConfig, grant: Grant) -> DictConfig:
    """A copy of ``cfg`` whose ``threads`` is the count the job uses (what its record logs)."""
    return OmegaConf.merge(cfg, {"threads": grant.threads})


def launcher_jobs() -> tuple[int, str]:
    """How many jobs the running Hydra launcher runs at once in this process (its ``n_jobs``; 1 for the
    basic launcher, a single run, and launchers that give each job its own process or allocation), and
    the launcher's name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1, ""
    hc = HydraConfig.get()
    name = str(hc.runtime.choices.get("hydra/launcher") or "")
    n_jobs = hc.launcher.get("n_jobs") or 1
    return (cores() if n_jobs < 0 else int(n_jobs)), name


def for_job(cfg: DictConfig) -> tuple[DictConfig, Grant]:
    """The job's config with its thread count decided (``threads`` set), and the grant behind it."""
    jobs, launcher = launcher_jobs()
    grant = settle(decide(cfg.threads, jobs, launcher))
    return with_threads(cfg, grant), grant

"""A job's thread count (threads.py): decided from what the engine granted, logged, and treated alike by
resume, the phase-1 cache and the report (config.Role.execution). The engines themselves are exercised
by tests/test_engines.py (joblib, Ray: the count logged and a job reproduced bit for bit, with a control
showing that the count changes the bits) and tests/test_slurm.py (SLURM_CPUS_PER_TASK)."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from finetune_ablation import threads
from finetune_ablation.config import Config, Role, role_of
from finetune_ablation.report.design import unit_ids
from finetune_ablation.run.phase1_cache import phase1_key
from finetune_ablation.tracking import config_hash

NOT_SLURM = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")


@pytest.fixture
def outside_slurm(monkeypatch):
    for name in NOT_SLURM:
        monkeypatch.delenv(name, raising=False)


def test_the_config_value_wins(outside_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert threads.decide(3, parallel_jobs=2, launcher="joblib") == threads.Grant(3, "threads=3 (config)")


def test_a_slurm_job_gets_its_cpus_per_task_else_its_cpus_on_the_node(outside_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "6")
    assert threads.decide(None, 1) == threads.Grant(6, "SLURM_CPUS_ON_NODE=6")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert threads.decide(None, 1) == threads.Grant(4, "SLURM_CPUS_PER_TASK=4")
    # a joblib sweep inside the allocation divides it
    shared = threads.Grant(2, "SLURM_CPUS_PER_TASK=4 / 2 parallel jobs (joblib n_jobs)")
    assert threads.decide(None, 2, "joblib") == shared


def test_slurm_variables_outside_a_job_are_ignored(outside_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")  # left over in a shell, no SLURM_JOB_ID
    cores = threads.cores()
    assert threads.decide(None, 1) == threads.Grant(cores, f"{cores} cores")


def test_parallel_jobs_share_the_cores_at_least_one_thread_each(outside_slurm):
    cores = threads.cores()
    assert threads.decide(None, 2, "joblib").threads == max(1, cores // 2)
    assert threads.decide(None, cores * 4, "joblib").threads == 1


def test_the_thread_count_is_in_the_phase1_key_but_not_in_resumes_hash_nor_a_factor():
    """One role, three consumers that agree: a cached phase 1 must hold this run's bits (in the key); a run
    that differs only in threads computes the same job to float tolerance (resume reuses it, the report
    merges the two into one replicate)."""
    assert role_of("threads") is Role.execution
    one, two = OmegaConf.structured(Config), OmegaConf.structured(Config)
    one.model.weights, two.model.weights = None, None
    one.threads, two.threads = 1, 2
    assert phase1_key(one, "images") != phase1_key(two, "images")
    assert config_hash(one) == config_hash(two)

    runs = pd.DataFrame(
        {
            "params.threads": ["1", "2", "1"],
            "params.model.dropout": ["0.2", "0.2", "0.5"],
            "params.seed": ["1", "1", "1"],
        }
    )
    units = unit_ids(runs)
    assert units[0] == units[1] != units[2]


@pytest.mark.slow
def test_a_process_whose_tensorflow_already_runs_logs_the_count_it_really_has():
    """TensorFlow fixes its pools when its runtime starts: a later job in the same process (a reused
    worker) cannot change them, so the count it logs is the one it really has."""
    import tensorflow as tf

    real = threads.apply(threads.cores())
    _ = tf.constant(1.0) + 1.0  # the runtime is up: its pools are fixed now
    # 0: an earlier test in this worker started TensorFlow with its default pools (every core)
    assert (tf.config.threading.get_intra_op_parallelism_threads() or threads.cores()) == real
    settled = threads.settle(threads.Grant(real + 1, "joblib"))
    assert settled.threads == real
    assert settled.granted_by.startswith(f"{real}: TensorFlow already ran in this process with {real}")
    assert threads.settle(threads.Grant(real, "x")) == threads.Grant(real, "x")

"""Runs whose process is gone are marked KILLED by the next ``ablate`` / ``ablate-report``; live runs
never are; a process that stops on an error or interrupt ends its own open runs.

Real processes throughout: dead pids come from processes that really exited, live ones from processes
that really run, and the slow tests SIGKILL real ``ablate`` subprocesses once the store shows them
RUNNING (a condition polled in the store, never a fixed sleep)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from finetune_ablation import liveness, reaper, tracking

from .helpers import FAST, new_store, run_ablate, runs

QUICK = [*FAST, "train.initial_epochs=1", "train.fine_tune_epochs=1", "diagnostics=off"]
WAIT_S = 900  # a safety net for a hung subprocess on a loaded machine, not a timing assertion


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def _tags_of(pid: int, **changes: str) -> dict[str, str]:
    """Liveness tags as process ``pid`` on this machine would have written them."""
    tags = {**liveness.process_tags(), liveness.PID_TAG: str(pid)}
    start = liveness.process_start(pid)
    tags[liveness.PROCESS_START_TAG] = f"{start:.2f}" if start is not None else "1.00"
    return {**tags, **changes}


def _ago(seconds: float) -> str:
    return liveness.format_time(liveness.now_utc() - timedelta(seconds=seconds))


# --- judging a run by its tags ---------------------------------------------------------------------


def test_this_process_and_other_live_processes_are_alive():
    assert reaper.death_reason(liveness.process_tags()) is None
    sleeper = _sleeper()
    try:
        assert reaper.death_reason(_tags_of(sleeper.pid)) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "is gone" in reaper.death_reason(_tags_of(sleeper.pid))


def test_a_reused_pid_is_not_the_runs_process():
    """Our own pid, alive, but recorded with another start time: the run's process is gone."""
    recorded = float(liveness.process_tags()[liveness.PROCESS_START_TAG]) - 3600
    reason = reaper.death_reason(_tags_of(os.getpid(), **{liveness.PROCESS_START_TAG: f"{recorded:.2f}"}))
    assert reason is not None and "another process" in reason


def test_a_zombie_is_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: it stays a zombie
    deadline = time.monotonic() + 60
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "is gone" in reaper.death_reason(_tags_of(proc.pid, **{liveness.PROCESS_START_TAG: "1.00"}))
    proc.wait()


def test_another_hosts_run_is_judged_by_its_heartbeat():
    other = {liveness.HOST_TAG: "elsewhere", liveness.PID_TAG: "1"}
    limit = max(reaper.STALE_AFTER_S, 10 * liveness.HEARTBEAT_INTERVAL_S)
    fresh = _tags_of(1, **other, **{liveness.HEARTBEAT_TAG: _ago(limit / 2)})
    stale = _tags_of(1, **other, **{liveness.HEARTBEAT_TAG: _ago(limit + 60)})
    assert reaper.death_reason(fresh) is None  # pid 1 is alive here, but it is not that host's pid 1
    assert "no heartbeat from process 1 on elsewhere" in reaper.death_reason(stale)
    slow_beat = {**stale, liveness.HEARTBEAT_INTERVAL_TAG: str(limit)}  # it promised a beat only that often
    assert reaper.death_reason(slow_beat) is None
    other_container = _tags_of(1, **{liveness.PID_NAMESPACE_TAG: "pid:[1]", liveness.HEARTBEAT_TAG: _ago(5)})
    assert reaper.death_reason(other_container) is None


def test_runs_without_a_liveness_signal_are_left_alone():
    assert reaper.death_reason({}) is None
    assert reaper.death_reason({"mlflow.user": "someone"}) is None


# --- reaping a real store --------------------------------------------------------------------------


def test_reap_marks_only_dead_runs_killed(tracking_uri):
    client = tracking.connect(tracking_uri)
    exp = tracking.ensure_experiment(client, tracking_uri, "e")
    sleeper = _sleeper()
    dead_pid = _exited_pid()
    try:
        made = {
            "dead": _tags_of(dead_pid, **{liveness.HEARTBEAT_TAG: _ago(40)}),
            "live": _tags_of(sleeper.pid),
            "stale": _tags_of(7, **{liveness.HOST_TAG: "elsewhere", liveness.HEARTBEAT_TAG: _ago(86400)}),
            "fresh": _tags_of(7, **{liveness.HOST_TAG: "elsewhere"}),
            "untagged": {},
        }
        ids = {name: client.create_run(exp, tags=tags, run_name=name).info.run_id for name, tags in made.items()}
        done = client.create_run(exp, tags=made["dead"], run_name="done").info.run_id
        client.set_terminated(done, "FINISHED")

        reaped = reaper.reap(client)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert set(reaped) == {ids["dead"], ids["stale"]}
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "live": "RUNNING", "stale": "KILLED", "fresh": "RUNNING", "untagged": "RUNNING"}
    assert client.get_run(done).info.status == "FINISHED"
    dead = client.get_run(ids["dead"])
    assert dead.data.tags[reaper.REAPED_TAG] == f"process {dead_pid} on {socket.gethostname()} is gone"
    assert dead.data.tags["error"].startswith("killed: process")
    assert f"pid {os.getpid()}" in dead.data.tags[reaper.REAPED_BY_TAG]
    beat = reaper._parse_time(made["dead"][liveness.HEARTBEAT_TAG])
    assert dead.info.end_time == int(beat.timestamp() * 1000)  # died after its last heartbeat
    # the live process is gone now (killed above) without ending its run: the next look reaps it
    assert list(reaper.reap(client)) == [ids["live"]]
    assert reaper.reap(client) == {}


# A process that holds one run's heartbeat open until the store shows it refreshed (or a deadline passes).
_HOLD_HEARTBEAT = """
import sys, time
import mlflow
from finetune_ablation import liveness
uri, run_id, first = sys.argv[1:]
client = mlflow.MlflowClient(uri)
with liveness.heartbeat(uri, run_id):
    deadline = time.monotonic() + 120
    while client.get_run(run_id).data.tags[liveness.HEARTBEAT_TAG] == first and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def test_the_heartbeat_refreshes_while_the_run_is_open(tracking_uri):
    """In a process of its own, with the interval a user sets (``ABLATE_HEARTBEAT_INTERVAL_S``): this
    process's heartbeat thread may already be asleep for the default 30 s, started by an earlier test."""
    client = tracking.connect(tracking_uri)
    exp = tracking.ensure_experiment(client, tracking_uri, "e")
    first = liveness.format_time(liveness.now_utc() - timedelta(seconds=10))
    run_id = client.create_run(exp, tags={**liveness.process_tags(), liveness.HEARTBEAT_TAG: first}).info.run_id
    env = {**os.environ, "ABLATE_HEARTBEAT_INTERVAL_S": "0.2"}
    held = subprocess.run(
        [sys.executable, "-c", _HOLD_HEARTBEAT, tracking_uri, run_id, first], env=env, capture_output=True, text=True
    )
    assert held.returncode == 0, held.stderr[-3000:]
    assert reaper._parse_time(client.get_run(run_id).data.tags[liveness.HEARTBEAT_TAG]) > reaper._parse_time(first)


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (KeyboardInterrupt(), "KILLED", "interrupted (Ctrl-C)"),
        (KeyboardInterrupt("SIGTERM"), "KILLED", "interrupted (SIGTERM)"),
        (ValueError("n_trials=0 is out of range\nmore"), "FAILED", "ValueError: n_trials=0 is out of range"),
    ],
)
def test_a_stopping_process_ends_its_open_runs(tracking_uri, error, status, reason):
    client = tracking.connect(tracking_uri)
    exp = tracking.ensure_experiment(client, tracking_uri, "e")
    run_id = client.create_run(exp, tags=liveness.process_tags()).info.run_id
    ended_with = []

    def summary_so_far(final: str) -> None:
        ended_with.append(final)
        client.set_tag(run_id, "sweep.jobs", "1")
        client.set_terminated(run_id, final)

    liveness.start(tracking_uri, run_id, on_abort=summary_so_far)
    with pytest.raises(type(error)), liveness.ending_open_runs():
        raise error
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["error"], ended_with) == (status, reason, [status])
    assert run.data.tags["sweep.jobs"] == "1"


def test_hydras_exit_after_an_error_reports_the_error():
    """Hydra prints an exception, then calls sys.exit(1) while handling it: the cause is the context."""
    try:
        try:
            raise ValueError("bad sweeper setting")
        except ValueError:
            sys.exit(1)
    except SystemExit as exc:
        assert liveness._reason(exc) == "ValueError: bad sweeper setting"


# --- real processes killed -------------------------------------------------------------------------


def _as_from_a_terminal() -> None:
    """In the child before exec: Ctrl-C as a terminal delivers it. A shell without job control starts
    background commands with SIGINT ignored, and children inherit that (so does a CI started with ``&``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("ablate")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [str(exe), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_as_from_a_terminal,
    )


def _wait_for(condition, proc: subprocess.Popen | None = None) -> None:
    """Poll the store until ``condition()`` holds (fail if the process ends first)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert proc is None or proc.poll() is None, "the process ended before the awaited state"
        assert time.monotonic() < deadline, "timed out waiting for the store"
        time.sleep(0.5)


def _by_pid(uri: str, pid: int) -> list:
    return [r for r in runs(uri) if r.data.tags.get(liveness.PID_TAG) == str(pid)]


@pytest.mark.slow
def test_a_sigkilled_sweep_is_reaped_and_resumed(tmp_path, image_dir):
    uri = new_store(tmp_path)
    tracking.connect(uri)  # this test's own polling must not race the sweep in creating the store
    sweep = ["-m", *QUICK, f"data.dir={image_dir}", f"tracking.uri={uri}", "seed=1,2"]
    proc = _start(tmp_path, *sweep, f"hydra.sweep.dir={tmp_path / 'first'}")

    def one_done_one_running() -> bool:
        states = sorted(r.info.status for r in runs(uri) if "mlflow.parentRunId" in r.data.tags)
        return states == ["FINISHED", "RUNNING"]

    _wait_for(one_done_one_running, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r.info.run_id: r.info.status for r in runs(uri)}
    assert sorted(before.values()) == ["FINISHED", "RUNNING", "RUNNING"]  # parent and its job: ghosts

    resumed = run_ablate(*sweep, f"hydra.sweep.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r.info.run_id: r for r in runs(uri)}
    ghosts = [run_id for run_id, status in before.items() if status == "RUNNING"]
    for run_id in ghosts:
        run = after[run_id]
        assert run.info.status == "KILLED"
        assert run.data.tags[reaper.REAPED_TAG] == f"process {proc.pid} on {socket.gethostname()} is gone"
    assert [r for r in after.values() if r.info.status == "RUNNING"] == []
    new_parent = next(r for r in after.values() if r.data.tags.get("sweep.dir") == str(tmp_path / "again"))
    assert new_parent.data.tags["sweep.role"] == "parent" and new_parent.info.status == "FINISHED"
    assert (new_parent.data.tags["sweep.jobs"], new_parent.data.tags["sweep.reused"]) == ("2", "1")
    finished = {r.data.params.get("seed") for r in after.values() if r.info.status == "FINISHED"}
    assert {"1", "2"} <= finished  # the missing job was trained, the done one reused
    assert "was RUNNING but process" in resumed.stderr + resumed.stdout


@pytest.mark.slow
def test_a_killed_single_run_is_reaped_and_a_live_one_is_not(tmp_path, image_dir):
    uri = new_store(tmp_path)
    tracking.connect(uri)
    args = [*QUICK, f"data.dir={image_dir}", f"tracking.uri={uri}"]
    doomed, live = _start(tmp_path, *args, "seed=1"), _start(tmp_path, *args, "seed=2")
    try:
        _wait_for(lambda: _by_pid(uri, doomed.pid) and _by_pid(uri, live.pid), doomed)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        report = subprocess.run(
            [str(Path(sys.executable).with_name("ablate-report")), "--experiment", "finetune-ablation",
             "--tracking-uri", uri, "--out", str(tmp_path / "report")],
            cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S,
        )  # fmt: skip
        (killed,) = _by_pid(uri, doomed.pid)
        assert killed.info.status == "KILLED", report.stderr[-3000:]
        assert "is gone" in killed.data.tags[reaper.REAPED_TAG]
        assert live.poll() is None, "the live run ended before the reaper looked: nothing was tested"
        (running,) = _by_pid(uri, live.pid)
        assert running.info.status == "RUNNING" and reaper.REAPED_TAG not in running.data.tags
        assert live.wait(timeout=WAIT_S) == 0
    finally:
        for proc in (doomed, live):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (finished,) = _by_pid(uri, live.pid)
    assert finished.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["hydra.sweeper.n_trials=0"], "ValueError: hydra.sweeper.n_trials=0 is out of range"),
        (
            ["hydra.sweeper.params={train.fine_tune_lr:'interval(1e-4'}"],
            "OverrideParseException: no viable alternative at input 'interval(1e-4'",
        ),
    ],
    ids=["n_trials=0", "bad-grammar"],
)
def test_a_sweeper_that_cannot_start_leaves_no_running_parent(tmp_path, image_dir, bad, says):
    uri = new_store(tmp_path)
    result = run_ablate(
        "-m", "experiment=lr_search", *QUICK, f"data.dir={image_dir}", f"tracking.uri={uri}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", *bad, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2  # bad input: one error line (docs/studies-and-resume.md)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    assert "Traceback" not in result.stderr
    (parent,) = runs(uri, "lr_search")
    assert parent.data.tags["sweep.role"] == "parent"
    assert parent.info.status == "FAILED"
    assert parent.data.tags["error"] == says
    assert parent.data.tags["sweep.jobs"] == "0"  # the summary so far was written


@pytest.mark.slow
def test_sigterm_ends_the_open_run_killed(tracking_uri):
    """A batch scheduler's ``kill PID``: the process ends its run itself, KILLED with the reason."""
    script = (
        "import sys, time\n"
        "from finetune_ablation import liveness, tracking\n"
        "uri = sys.argv[1]\n"
        "client = tracking.connect(uri)\n"
        "exp = tracking.ensure_experiment(client, uri, 'e')\n"
        "run_id = client.create_run(exp, tags=liveness.process_tags()).info.run_id\n"
        "with liveness.ending_open_runs():\n"
        "    liveness.start(uri, run_id)\n"
        "    print(run_id, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, tracking_uri], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()  # the run is open once its id is printed
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) != 0
    run = tracking.connect(tracking_uri).get_run(run_id)
    assert (run.info.status, run.data.tags["error"]) == ("KILLED", "interrupted (SIGTERM)")


@pytest.mark.slow
def test_ctrl_c_ends_the_sweep_killed_with_its_summary_so_far(tmp_path, image_dir):
    uri = new_store(tmp_path)
    tracking.connect(uri)
    proc = _start(tmp_path, "-m", *QUICK, f"data.dir={image_dir}", f"tracking.uri={uri}", "seed=1,2")
    _wait_for(lambda: any("mlflow.parentRunId" in r.data.tags for r in runs(uri)), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT_S) != 0
    found = runs(uri)
    (parent,) = [r for r in found if r.data.tags.get("sweep.role") == "parent"]
    (child,) = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (parent.info.status, parent.data.tags["error"]) == ("KILLED", "interrupted (Ctrl-C)")
    assert parent.data.tags["sweep.jobs"] == "1"  # the summary so far: the interrupted job
    assert child.info.status == "KILLED"

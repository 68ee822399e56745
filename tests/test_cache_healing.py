"""The phase-1 cache heals: a damaged entry is detected by its checksums and recomputed (the run says so
in a tag), and what a killed writer leaves (a half-written ``.partial-<pid>`` folder, a lock file) is
removed by the next user of the cache, never waited on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock, Timeout

from finetune_ablation.cli import run_job
from finetune_ablation.run.phase1_cache import CHECKSUMS, Phase1Cache, Phase1State

from .helpers import history, make_cfg, runs


def _state() -> Phase1State:
    values = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([7], dtype=np.int64)]
    rows = [{"epoch": 0, "phase": 1, "loss": 0.5}]
    return Phase1State(["dense/kernel", "seed/state"], values, rows, {"phase1/x": 1.0}, "report")


def _saved(cache: Phase1Cache, key: str) -> Path:
    with cache.locked(key):
        cache.save(key, _state())
    return cache.root / key


def test_an_entry_round_trips_and_leaves_no_lock_file(tmp_path):
    cache = Phase1Cache(tmp_path)
    entry = _saved(cache, "k1")
    assert sorted(p.name for p in entry.iterdir()) == sorted([CHECKSUMS, "state.json", "variables.npz"])
    assert sorted(p.name for p in cache.root.iterdir()) == ["k1"]  # no lock file, no partial
    with cache.locked("k1"):
        loaded = cache.load("k1")
    assert loaded is not None and loaded.paths == ["dense/kernel", "seed/state"]
    for got, want in zip(loaded.values, _state().values, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert (loaded.rows, loaded.metrics, loaded.report) == (_state().rows, {"phase1/x": 1.0}, "report")


def _truncate(entry: Path) -> None:
    data = (entry / "variables.npz").read_bytes()
    (entry / "variables.npz").write_bytes(data[: len(data) // 2])


def _flip_a_byte(entry: Path) -> None:
    data = bytearray((entry / "state.json").read_bytes())
    data[len(data) // 2] ^= 0x01
    (entry / "state.json").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "variables.npz does not match its checksum"),
        (_flip_a_byte, "state.json does not match its checksum"),
        (lambda e: (e / CHECKSUMS).unlink(), f"no valid {CHECKSUMS}"),
        (lambda e: (e / "variables.npz").unlink(), "variables.npz does not match its checksum"),
    ],
    ids=["truncated", "changed", "no_checksums", "file_missing"],
)
def test_a_damaged_entry_is_removed_and_reported(tmp_path, caplog, damage, reason):
    cache = Phase1Cache(tmp_path)
    entry = _saved(cache, "k1")
    damage(entry)
    with cache.locked("k1"):
        assert cache.load("k1") is None
        assert not entry.exists()
        cache.save("k1", _state())  # what the caller does next: recompute
        assert cache.load("k1") is not None
    assert reason in caplog.text and "removed and recomputed" in caplog.text


def test_save_outside_the_lock_is_a_programming_error(tmp_path):
    with pytest.raises(RuntimeError, match="outside locked"):
        Phase1Cache(tmp_path).save("k1", _state())


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from finetune_ablation.run import phase1_cache as c

    real_write = c._write_synced

    def stalls_mid_write(path, data):  # the real save, stopped half-way through its biggest file
        if path.name == "variables.npz":
            path.write_bytes(data[: len(data) // 2])
            print("mid-write", flush=True)
            time.sleep(600)
        real_write(path, data)

    c._write_synced = stalls_mid_write
    store = c.Phase1Cache(Path(sys.argv[1]))
    with store.locked("k1"):
        store.save("k1", c.Phase1State(["w"], [np.zeros(100_000)], [], {}, ""))
    """
)


@pytest.mark.slow
def test_leftovers_of_a_killed_writer_are_cleaned_up(tmp_path):
    cache = Phase1Cache(tmp_path)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        assert writer.stdout.readline().strip() == "mid-write"
        partial = cache.root / f"k1.partial-{writer.pid}"
        lock_file = cache.root / "k1.lock"
        assert partial.is_dir() and lock_file.exists()
        cache.clean()  # a live writer's files are left alone, and its lock is not waited for
        assert partial.is_dir() and lock_file.exists()
        with pytest.raises(Timeout):
            FileLock(str(lock_file)).acquire(blocking=False)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert partial.is_dir() and lock_file.exists() and not (cache.root / "k1").exists()

    # another key's leftovers from a process that has exited normally
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os; os.makedirs({str(cache.root / 'k2.partial-1')!r}); "
            f"open({str(cache.root / 'k2.lock')!r}, 'w').close()",
        ],
        check=True,
    )
    with cache.locked("k1"):  # the next user: takes the freed lock, removes every leftover
        assert sorted(p.name for p in cache.root.iterdir()) == ["k1.lock"]
        assert cache.load("k1") is None
        cache.save("k1", _state())
    assert sorted(p.name for p in cache.root.iterdir()) == ["k1"]


@pytest.mark.slow
def test_a_truncated_entry_heals_in_a_real_run(image_dir, tracking_uri, tmp_path):
    """The reported case: a truncated ``variables.npz`` made every later run with that key die with
    BadZipFile. Now the run recomputes phase 1, says so, and logs what an undamaged cache gives."""
    overrides = ["cache.phase1=true", f"cache.dir={tmp_path / 'cache'}", "train.fine_tune_epochs=1", "diagnostics=off"]
    assert run_job(make_cfg(image_dir, tracking_uri, *overrides)) is not None
    first = runs(tracking_uri)[-1]
    key = first.data.tags["phase1_cache_key"]
    entry = tmp_path / "cache" / "phase1" / key
    _truncate(entry)

    assert run_job(make_cfg(image_dir, tracking_uri, *overrides)) is not None
    healed = runs(tracking_uri)[-1]
    assert healed.info.status == "FINISHED"
    assert healed.data.tags["phase1_cache"] == "miss"
    warning = healed.data.tags["phase1_cache_warning"]
    assert f"entry {key} was bad (variables.npz does not match its checksum" in warning
    assert "phase1_cache_warning" not in first.data.tags
    for metric in first.data.metrics:  # recomputed, so the same bits as the first computation
        assert history(tracking_uri, healed.info.run_id, metric) == history(tracking_uri, first.info.run_id, metric)
    cache = Phase1Cache(tmp_path / "cache")
    with cache.locked(key):
        assert cache.load(key) is not None  # the entry is whole again

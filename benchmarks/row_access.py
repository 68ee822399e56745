"""How to keep a large table on local disk and read it back in shuffled batches: seconds per epoch and the
resident memory it takes, for the ways TensorFlow offers and the suite's own (run/kept_rows.py).

    .venv/bin/python benchmarks/row_access.py            # 10,000 rows of 96x96x3 float32 (1.03 GiB), 2 epochs
    .venv/bin/python benchmarks/row_access.py --rows 2000

Every way is run in its own process on the same rows (a deterministic function of the row's index, so no
table is ever built in memory first) and must give each epoch the order the suite's training pipeline uses:
``shuffle`` over the whole split with the phase's seed. The ways:

- ``memory``: the suite's in-memory table (``KeptRows`` in memory), shuffled positions, rows gathered;
- ``scratch``: the suite's scratch file (``KeptRows`` on disk, read with ``pread``), the same positions;
- ``cache``: ``Dataset.cache(filename)``, then ``shuffle`` of the rows with a buffer of the whole table;
- ``save``: ``Dataset.save`` / ``Dataset.load``, then the same ``shuffle``;
- ``cache-small-buffer``: ``Dataset.cache(filename)`` and a ``shuffle`` buffer of 1,024 rows: bounded
  memory, but another order (it is not the split's shuffle, so a run would not give the same numbers).

Prints one line per way: the first pass (writing), each epoch after it, and the peak resident memory while
the epochs ran (``VmHWM`` after resetting it) above the process's resident memory before them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

WAYS = ("memory", "scratch", "cache", "save", "cache-small-buffer")
SHAPE = (96, 96, 3)
BATCH = 32


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def one_way(way: str, rows: int, epochs: int, folder: Path) -> dict:
    import numpy as np
    import tensorflow as tf

    from finetune_ablation.run.kept_rows import KeptRows

    def row(i):
        return tf.random.stateless_uniform(SHAPE, seed=tf.stack([i, tf.constant(0, tf.int64)]), maxval=255.0)

    positions = tf.data.Dataset.range(rows)
    started = time.perf_counter()
    if way in ("memory", "scratch"):
        kept = KeptRows([SHAPE], rows, "memory" if way == "memory" else "disk", folder)
        for start in range(0, rows, 256):
            batch = tf.map_fn(
                row, tf.range(start, min(start + 256, rows), dtype=tf.int64), fn_output_signature=tf.float32
            )
            kept.write(start, [batch.numpy()])
        shuffled = positions.shuffle(rows, seed=1, reshuffle_each_iteration=True).batch(BATCH)
        dataset = shuffled.map(lambda i: kept.gather(i)[0])
    else:
        made = positions.map(row)
        if way == "save":
            made.save(str(folder / "saved"))
            source = tf.data.Dataset.load(str(folder / "saved"))
        else:
            source = made.cache(str(folder / "cache"))
            for _ in source:  # the first pass writes the cache file
                pass
        buffer = 1024 if way == "cache-small-buffer" else rows
        dataset = source.shuffle(buffer, seed=1, reshuffle_each_iteration=True).batch(BATCH)
    first = time.perf_counter() - started
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # the peak (VmHWM) starts again from now
        refs.write("5")
    seconds, checksum = [], 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        for batch in dataset:
            checksum += float(np.asarray(batch)[0, 0, 0, 0])
        seconds.append(round(time.perf_counter() - started, 2))
    peak = _resident_kib("VmHWM")
    return {
        "way": way,
        "write_s": round(first, 1),
        "epoch_s": seconds,
        "peak_above_start_mib": round((peak - before) / 1024),
        "resident_before_mib": round(before / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one way, in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(one_way(args.way, args.rows, args.epochs, Path(args.folder))))
        return
    size = args.rows * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] / 2**30
    print(f"{args.rows} rows of {SHAPE} float32 ({size:.2f} GiB), batches of {BATCH}, {args.epochs} epochs")
    for way in WAYS:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, __file__, f"--rows={args.rows}", f"--epochs={args.epochs}"]
            done = subprocess.run([*command, f"--way={way}", f"--folder={folder}"], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{way} failed:\n{done.stderr[-2000:]}")
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

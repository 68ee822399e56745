"""How fast the suite is, as ratios measured side by side in one run of this script (never timed tests).

    .venv/bin/python benchmarks/speed.py            # the course's sizes: 160 px, batch 32, 300 images
    .venv/bin/python benchmarks/speed.py --quick    # tiny sizes: checks the script, numbers mean little
    .venv/bin/python benchmarks/speed.py --only 3b,6  # some groups: 1 (with 1b, 2, 2b, 4), 3, 3b, 5, 6, 7
    .venv/bin/python benchmarks/speed.py --only 7 --out benchmarks/speed_by_size.csv  # cost against size

Every suite measurement is a real ``ablate`` command in a subprocess (as a user runs it), on generated
images, with MLflow and the caches in a temporary folder. Ratios compare runs made minutes apart on the
same machine, interleaved when ``--repeats`` > 1, so machine noise hits both sides alike.

1. suite, diagnostics off  vs  the course's plain Keras script (benchmarks/plain_keras.py): wall time
2. diagnostics full (and final)  vs  off: wall time
3. the unfreeze_depth study with the phase-1 cache  vs  without: speed-up against the Amdahl bound that
   phase-1 reuse allows, and whether metrics are identical
3b. a 6-trial search of train.fine_tune_lr with augment=none, reusing phase 1 and training phase 2 on the
   frozen bottom computed once  vs  neither, and how far the metrics are apart (float tolerance)
4. phase 1 with augment=none, feature cache on  vs  off: speed-up of phase 1 (its ``timing.phase1_seconds``)
5. images/s of the suite's frozen and unfrozen phases  vs  raw ``model.fit`` on in-memory arrays and
   ``base.predict`` of the same model (the ceiling)
6. peak resident memory of one run, the frozen inputs' size per 1000 images, and the resident memory at
   the end of every phase-2 epoch (benchmarks/memory_per_epoch.py): does a run grow while it trains?
7. cost against size: 300, 1,000, 3,000 and 10,000 generated JPEGs (96 px, 1 + 1 epochs), the suite
   (diagnostics off and full, augment none and standard) beside the plain Keras script, seconds per epoch
   and peak resident memory at each size; the same run with everything kept in memory vs on disk; and a
   6-rate fine_tune_lr search (augment=none, 3 + 3 epochs) at the largest size without vs with reuse

Each row is printed as soon as it is measured; at the end the table is printed again and written to
``--out`` (CSV). At the course's sizes all groups take one to two hours on 2 idle cores (group 1 about
12 minutes, 3 and 3b about 45 and 30); group 7, which makes its own folders, one to two hours."""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow
import pandas as pd

HERE = Path(__file__).resolve().parent
ABLATE = Path(sys.executable).with_name("ablate")


@dataclass(frozen=True)
class Sizes:
    image_size: int
    batch_size: int
    per_class: int
    initial_epochs: int
    fine_tune_epochs: int
    depths: tuple[int, ...]


COURSE = Sizes(160, 32, 150, 5, 5, (0, 60, 100, 120, 140, 154))  # the unfreeze_depth study's depths
QUICK = Sizes(32, 8, 20, 1, 1, (100, 154))
GROUPS = ("1", "3", "3b", "5", "6", "7")  # --only: 1 also measures 1b, 2, 2b and 4; 5 is 5a-5c; 7 is 7-7g
COURSE_GROUPS = frozenset(GROUPS) - {"7"}  # at the course's sizes, on one folder
LEARNING_RATES = ("1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3")  # benchmark 3b's search
MEMORY_EPOCHS = 12  # row 6's phase 2: long enough to see whether resident memory levels off


class Bench:
    """Runs ``ablate`` and the plain script on one generated folder, each into its own MLflow experiment."""

    def __init__(self, root: Path, sizes: Sizes, images: Path | None = None):
        from finetune_ablation.demo_data import write_image_folder

        self.root, self.sizes = root, sizes
        self.images = images or root / "images"
        if images is None:
            write_image_folder(self.images, sizes.image_size, sizes.per_class, seed=0)
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.count = 0
        self.peak_rss_mb: dict[str, float] = {}
        self.cpu_samples: dict[str, list[tuple[float, float]]] = {}

    def common(self) -> dict[str, str]:
        """Overrides every suite command shares (by key, so a command can replace one)."""
        s = self.sizes
        pairs = [
            f"data.dir={self.images}",
            f"data.image_size={s.image_size}",
            f"data.batch_size={s.batch_size}",
            "model.weights=null",  # no network; the work per image is the same as with ImageNet weights
            f"train.initial_epochs={s.initial_epochs}",
            f"train.fine_tune_epochs={s.fine_tune_epochs}",
            "train.verbose=0",
            f"tracking.uri={self.uri}",
            f"cache.dir={self.root / 'cache'}",
        ]
        return dict(pair.split("=", 1) for pair in pairs)

    def ablate(self, *overrides: str, multirun: bool = False) -> tuple[float, str]:
        """Wall seconds of one ``ablate`` command, and the MLflow experiment it logged to (its peak RSS:
        ``self.peak_rss_mb[experiment]``)."""
        self.count += 1
        experiment = f"bench-{self.count}"
        settings = {
            **self.common(),
            **dict(o.split("=", 1) for o in overrides),
            "tracking.experiment": experiment,
            "hydra.run.dir": str(self.root / "runs" / experiment),
            "hydra.sweep.dir": str(self.root / "sweeps" / experiment),
        }
        args = [str(ABLATE), *(["-m"] if multirun else []), *(f"{k}={v}" for k, v in settings.items())]
        wall = _timed(args, self.root)[0]
        self.peak_rss_mb[experiment] = PEAK_RSS_MB[" ".join(args)]
        self.cpu_samples[experiment] = CPU_SAMPLES[" ".join(args)]
        return wall, experiment

    def plain_keras(self, fine_tune_epochs: int | None = None, memory: bool = False) -> tuple[float, dict]:
        s = self.sizes
        args = [sys.executable, str(HERE / "plain_keras.py"), str(self.images), f"--image-size={s.image_size}"]
        args += [f"--batch-size={s.batch_size}", "--epochs", str(s.initial_epochs)]
        args += [str(fine_tune_epochs or s.fine_tune_epochs), *(["--memory"] if memory else [])]
        wall, stdout = _timed(args, self.root)
        return wall, {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": PEAK_RSS_MB[" ".join(args)]}

    def runs(self, experiment: str) -> list:
        client = mlflow.MlflowClient(self.uri)
        exp = client.get_experiment_by_name(experiment)
        return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sweep.role") != "parent"]

    def run(self, experiment: str):
        (only,) = self.runs(experiment)
        return only


PEAK_RSS_MB: dict[str, float] = {}  # command's first word after the script -> peak RSS of its process


CPU_SAMPLES: dict[str, list[tuple[float, float]]] = {}  # command -> (time.time(), CPU seconds so far)


def _sample_cpu(pid: int, samples: list[tuple[float, float]], stop: threading.Event) -> None:
    """Every quarter second: the wall clock and the CPU seconds (user + system, all threads) process ``pid``
    has used so far (``/proc/<pid>/stat``). On a loaded machine CPU seconds measure the work; wall seconds
    also measure the wait for a core."""
    ticks = os.sysconf("SC_CLK_TCK")
    while not stop.wait(0.25):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        samples.append((time.time(), (int(fields[11]) + int(fields[12])) / ticks))


def cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The CPU seconds a sampled process had used at wall-clock time ``when`` (linear between samples)."""
    times = [t for t, _ in samples]
    i = min(max(bisect.bisect_left(times, when), 1), len(samples) - 1)
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1


def _timed(args: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds and stdout of a command; exits with its stderr if it fails. Its process's peak
    resident memory (``wait4``'s ``ru_maxrss``, KiB on Linux) is kept in ``PEAK_RSS_MB[" ".join(args)]``,
    its CPU seconds over time in ``CPU_SAMPLES[" ".join(args)]``."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(args, stdout=out, stderr=err, text=True, cwd=cwd, env=env)
        samples, stop = CPU_SAMPLES.setdefault(" ".join(args), []), threading.Event()
        sampler = threading.Thread(target=_sample_cpu, args=(process.pid, samples, stop), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        stop.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    PEAK_RSS_MB[" ".join(args)] = usage.ru_maxrss / 1024
    if process.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{stderr[-2000:]}")
    return wall, stdout


def _seconds(run, phase: str) -> float:
    return float(run.data.tags[f"timing.{phase}_seconds"])


def identical_metrics(bench: Bench, first: str, second: str) -> tuple[bool, int]:
    """Whether two sweeps logged the same metric histories, job by job (matched by fine_tune_at)."""
    client = mlflow.MlflowClient(bench.uri)

    def by_depth(experiment: str) -> dict[str, object]:
        return {r.data.params["model.fine_tune_at"]: r for r in bench.runs(experiment)}

    a, b = by_depth(first), by_depth(second)
    if a.keys() != b.keys():
        return False, 0
    compared = 0
    for depth, run in a.items():
        other = b[depth]
        if run.data.metrics.keys() != other.data.metrics.keys():
            return False, compared
        for key in run.data.metrics:
            left = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            right = [(m.step, m.value) for m in client.get_metric_history(other.info.run_id, key)]
            if sorted(left) != sorted(right):
                return False, compared
            compared += len(left)
    return True, compared


def ceiling_throughput(bench: Bench) -> dict[str, float]:
    """images/s of raw Keras on in-memory arrays: the same model's ``fit`` per phase and ``base.predict``."""
    import numpy as np

    from finetune_ablation.config import AugmentConfig, DataConfig, ModelConfig
    from finetune_ablation.run.augment import build_augmentation
    from finetune_ablation.run.data import load_datasets
    from finetune_ablation.run.model import build_classifier, freeze_base, load_base, unfreeze_top
    from finetune_ablation.run.train import compile_fresh, seed_everything

    s = bench.sizes
    seed_everything(42)
    data = load_datasets(DataConfig(dir=str(bench.images), image_size=s.image_size, batch_size=s.batch_size))
    x_train, y_train = (np.concatenate(parts) for parts in zip(*[(x, y) for x, y in data.train_in_order], strict=True))
    x_val, y_val = (np.concatenate(parts) for parts in zip(*[(x, y) for x, y in data.val], strict=True))
    per_epoch = len(x_train) + len(x_val)

    model_cfg = ModelConfig(weights=None)
    base = load_base(model_cfg, s.image_size)
    clf = build_classifier(model_cfg, base, build_augmentation(AugmentConfig(), 42), 2, s.image_size)

    def fit_rate(learning_rate: float, epochs: int) -> float:
        started = time.perf_counter()  # from compile, as the suite's phase timing
        compile_fresh(clf.model, clf.binary, learning_rate)
        clf.model.fit(
            x_train, y_train, batch_size=s.batch_size, epochs=epochs, validation_data=(x_val, y_val), verbose=0
        )
        return per_epoch * epochs / (time.perf_counter() - started)

    freeze_base(base)
    frozen_fit = fit_rate(1e-3, s.initial_epochs)
    inputs = clf.preprocess(np.concatenate([x_train, x_val]))
    base.predict(inputs[: s.batch_size], verbose=0)  # trace once: the ceiling is the steady state
    started = time.perf_counter()
    base.predict(inputs, batch_size=s.batch_size, verbose=0)
    predict = per_epoch / (time.perf_counter() - started)
    unfreeze_top(base, 120, freeze_bn=False)
    unfrozen_fit = fit_rate(1e-4, s.fine_tune_epochs)

    return {
        "frozen_fit": frozen_fit,
        "predict": predict,
        "unfrozen_fit": unfrozen_fit,
        "per_epoch": per_epoch,
    }


def frozen_input_bytes(image_size: int) -> dict[str, int]:
    """Bytes per image of the frozen inputs (run/feature_cache.py): pooled features, and the frozen
    bottom's activations at the default depth (fine_tune_at=120)."""
    import numpy as np

    from finetune_ablation.config import AugmentConfig, ModelConfig
    from finetune_ablation.gap.passes import FrozenBottom
    from finetune_ablation.run.augment import build_augmentation
    from finetune_ablation.run.model import build_classifier, load_base, unfreeze_top

    model_cfg = ModelConfig(weights=None)
    base = load_base(model_cfg, image_size)
    clf = build_classifier(model_cfg, base, build_augmentation(AugmentConfig(), 42), 2, image_size)
    unfreeze_top(base, 120, freeze_bn=False)
    pooled = 4 * int(np.prod(clf.pooled_shape))
    return {"pooled": pooled, "bottom": FrozenBottom(base, FrozenBottom.cut_of(base)).bytes_per_image}


def _printed(number: str, what: str, value: str, note: str = "") -> dict:
    """A row with a number to read, not a ratio to meet."""
    return {
        "benchmark": number,
        "what": what,
        "a": value,
        "b": "",
        "ratio": "",
        "target": "printed",
        "met": "-",
        "note": note,
    }


def amdahl_bound(uncached_wall: float, phase1_seconds: float, jobs: int) -> float:
    """The best speed-up phase-1 reuse allows a study: every job but the first skips its phase 1 and
    nothing else gets faster (Amdahl's law with phase 1 as the part that is sped up)."""
    return uncached_wall / (uncached_wall - phase1_seconds * (jobs - 1) / jobs)


def _row(number: str, what: str, a: tuple[str, float], b: tuple[str, float], target: str, note: str = "") -> dict:
    ratio = a[1] / b[1]
    bound = float(target[2:].rstrip("x"))
    met = ratio <= bound if target.startswith("<=") else ratio >= bound
    return {
        "benchmark": number,
        "what": what,
        "a": f"{a[0]} {a[1]:.2f}",
        "b": f"{b[0]} {b[1]:.2f}",
        "ratio": round(ratio, 2),
        "target": target,
        "met": "yes" if met else "NO",
        "note": note,
    }


def emit(rows: list[dict], row: dict) -> None:
    """Keep a row and print it at once: a long run shows each number as soon as it is measured."""
    rows.append(row)
    fields = [row["benchmark"], row["what"], row["a"], row["b"], str(row["ratio"]), row["target"], row["met"]]
    print(" | ".join(fields) + (f"  ({row['note']})" if row["note"] else ""), flush=True)


def relative_differences(bench: Bench, first: str, second: str, key: str) -> tuple[float, int, int]:
    """Largest relative difference of metric ``key`` between two sweeps' jobs (matched by fine_tune_lr),
    and in how many jobs its final value is equal."""
    client = mlflow.MlflowClient(bench.uri)
    a = {r.data.params["train.fine_tune_lr"]: r for r in bench.runs(first)}
    b = {r.data.params["train.fine_tune_lr"]: r for r in bench.runs(second)}
    largest, equal_final = 0.0, 0
    for depth, run in a.items():
        left = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        right = {m.step: m.value for m in client.get_metric_history(b[depth].info.run_id, key)}
        largest = max(largest, *(abs(left[k] - right[k]) / max(abs(right[k]), 1e-12) for k in left))
        equal_final += left[max(left)] == right[max(right)]
    return largest, equal_final, len(a)


def late_growth(sizes_mib: list[float]) -> float:
    """Resident memory gained over the second half of the epochs: the first ones warm up (tracing, tf.data
    buffers, the allocator's pools), so only growth after them says whether a long run keeps growing."""
    return sizes_mib[-1] - sizes_mib[len(sizes_mib) // 2] if len(sizes_mib) > 1 else 0.0


def resident_per_epoch(bench: Bench, *overrides: str) -> list[float]:
    """RSS (MiB) at the end of each phase-2 epoch of one run (benchmarks/memory_per_epoch.py)."""
    settings = {**bench.common(), **dict(o.split("=", 1) for o in overrides), "tracking.experiment": "bench-memory"}
    args = [sys.executable, str(HERE / "memory_per_epoch.py"), bench.uri, *(f"{k}={v}" for k, v in settings.items())]
    return json.loads(_timed(args, bench.root)[1].strip().splitlines()[-1])["phase2_epoch_end_mib"]


# Group 7: cost against size
SIZE_COUNTS = (300, 1_000, 3_000, 10_000)
SIZE_QUICK_COUNTS = (40, 80)
SIZE_PX = 96  # generated JPEGs of 96 px, trained at 96 px
SIZE_EPOCHS = 2  # each phase: a second epoch shows a steady epoch's cost apart from the first one's one-off work
SIZE_SETUP = (
    f"group 7: generated JPEGs, {SIZE_PX} px, batch 32, {SIZE_EPOCHS}+{SIZE_EPOCHS} epochs; the search {{0}}+{{0}}"
)
SUITE_VARIANTS = (("off", "standard"), ("full", "standard"), ("off", "none"), ("full", "none"))
SEARCH_EPOCHS = 3  # each phase of the search's trials: reuse amortises the frozen part's one pass over these
FLAT = 1.10  # "flat in N": peak memory at the largest size within this factor of the first size past the budgets


def write_jpeg_folder(directory: Path, image_size: int, per_class: int, seed: int) -> None:
    """``per_class`` generated JPEGs (quality 90) per class: the demo's drawing (demo_data.draw_target)."""
    import numpy as np

    from finetune_ablation.demo_data import CLASSES, draw_target

    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (directory / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_target(rng, label, image_size).save(directory / name / f"{name}_{i:05d}.jpg", quality=90)


def first_images(source: Path, target: Path, per_class: int) -> Path:
    """A folder of the first ``per_class`` images of each class of ``source`` (hard links)."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            os.link(image, target / folder.name / image.name)
    return target


@dataclass(frozen=True)
class Measured:
    per_epoch: float  # wall seconds of a steady epoch: the mean of each phase's epochs after its first
    per_epoch_cpu: float  # the CPU seconds those epochs used (all threads)
    phases: float  # wall seconds of both phases, compile to the end of fit: one-off work included
    peak_mb: float  # the process's peak resident memory
    storage: str = ""  # where the suite kept its pixels and frozen inputs

    def text(self) -> str:
        kept = f" [{self.storage}]" if self.storage else ""
        return (
            f"{self.per_epoch:.1f} s ({self.per_epoch_cpu:.1f} CPU s) per epoch, {self.phases:.0f} s both phases, "
            f"{self.peak_mb:.0f} MB{kept}"
        )


def _where(run) -> str:
    """'pixels memory, phase 1 memory, phase 2 disk': the run's storage.* tags, short."""
    tags = run.data.tags
    parts = [("pixels", "storage.decoded_pixels")]
    parts += [(f"phase {p}", f"storage.frozen_inputs.phase{p}") for p in (1, 2)]
    return ", ".join(f"{name} {tags[key].split(':')[0]}" for name, key in parts if key in tags)


def steady_epoch(ends: list[float], first_epochs: int) -> float:
    """Mean length of each phase's epochs after its first, from a clock read as each epoch ended: the first
    epoch of a phase also pays its one-off work (tracing, the frozen inputs computed once), so it is left out."""
    return statistics.mean(ends[i] - ends[i - 1] for i in range(1, len(ends)) if i != first_epochs)


def measure_suite(bench: Bench, *overrides: str) -> Measured:
    experiment = bench.ablate(*overrides, "cache.phase1=false", "tracking.log_model=false")[1]
    run = bench.run(experiment)
    history = mlflow.MlflowClient(bench.uri).get_metric_history(run.info.run_id, "loss")
    ends = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]  # logged as each epoch ends
    cpu = [cpu_at(bench.cpu_samples[experiment], end) for end in ends]
    first = bench.sizes.initial_epochs
    return Measured(
        steady_epoch(ends, first),
        steady_epoch(cpu, first),
        _seconds(run, "phase1") + _seconds(run, "phase2"),
        bench.peak_rss_mb[experiment],
        _where(run),
    )


def measure_plain(bench: Bench) -> Measured:
    result = bench.plain_keras()[1]
    first = bench.sizes.initial_epochs
    return Measured(
        steady_epoch(result["epoch_end_seconds"], first),
        steady_epoch(result["epoch_end_cpu_seconds"], first),
        result["phase1_seconds"] + result["phase2_seconds"],
        result["peak_rss_mb"],
    )


def time_rows(rows, number: str, what: str, a: tuple[str, Measured], b: tuple[str, Measured], target: str, note=""):
    """Two rows for one comparison of steady epochs: wall seconds (what a user waits) and CPU seconds (the
    work: on a machine shared with other jobs, wall seconds also count the wait for a core)."""
    for clock, seconds in (("wall", lambda m: m.per_epoch), ("CPU", lambda m: m.per_epoch_cpu)):
        first, second = (a[0], seconds(a[1])), (b[0], seconds(b[1]))
        emit(
            rows, _row(number, f"{what} ({clock} s per epoch)", first, second, target, note if clock == "wall" else "")
        )


def cost_against_size(root: Path, quick: bool, rows: list[dict]) -> None:
    """Group 7: at each size, the plain Keras script and the suite's four variants one after the other
    (smallest size first), then the targets across sizes, then the search at the largest size."""
    counts, image_size = (SIZE_QUICK_COUNTS, 32) if quick else (SIZE_COUNTS, SIZE_PX)
    largest = max(counts)
    write_jpeg_folder(root / "all", image_size, largest // 2, seed=0)
    benches: dict[int, Bench] = {}
    got: dict[tuple[int, str], Measured] = {}
    for n in counts:
        sizes = Sizes(image_size, 32 if not quick else 8, n // 2, SIZE_EPOCHS, SIZE_EPOCHS, ())
        bench = benches[n] = Bench(root / f"n{n}", sizes, first_images(root / "all", root / f"n{n}" / "images", n // 2))
        if n == counts[0]:  # a warm-up: file-system caches and the first imports before anything is timed
            bench.ablate("diagnostics=off", "cache.phase1=false", "tracking.log_model=false")
        got[n, "plain"] = measure_plain(bench)
        for level, augment in SUITE_VARIANTS:
            got[n, f"{level}/{augment}"] = measure_suite(bench, f"diagnostics={level}", f"augment={augment}")
        listed = "; ".join(f"{name} {m.text()}" for (size, name), m in got.items() if size == n)
        emit(rows, _printed("7", f"{n} images: seconds per epoch and peak memory", listed))

    suite_names = [f"{level}/{augment}" for level, augment in SUITE_VARIANTS]
    big = {name: got[largest, name] for name in ["plain", *suite_names]}
    time_rows(
        rows,
        "7a",
        f"{largest} images, diagnostics=off, augment=standard vs plain Keras script",
        ("suite", big["off/standard"]),
        ("plain", big["plain"]),
        "<=1.0x",
        f"augment=none: {big['off/none'].per_epoch:.1f} s; both phases in all (one-off work included): "
        f"suite {big['off/standard'].phases:.0f} s, plain {big['plain'].phases:.0f} s",
    )
    for augment in ("standard", "none"):
        time_rows(
            rows,
            "7b",
            f"{largest} images, augment={augment}: diagnostics=full vs off",
            ("full", big[f"full/{augment}"]),
            ("off", big[f"off/{augment}"]),
            "<=1.3x",
            f"both phases in all: full {big[f'full/{augment}'].phases:.0f} s, off "
            f"{big[f'off/{augment}'].phases:.0f} s (full computes the clean training images' frozen inputs "
            "once per phase)",
        )
    heaviest = max(suite_names, key=lambda name: big[name].peak_mb)
    emit(
        rows,
        _row(
            "7c",
            f"{largest} images: peak memory of the suite's heaviest variant vs the plain script (MB)",
            (heaviest, big[heaviest].peak_mb),
            ("plain", big["plain"].peak_mb),
            "<=1.5x",
            "all: " + ", ".join(f"{name} {big[name].peak_mb:.0f}" for name in suite_names),
        ),
    )
    for name in suite_names:
        # past the budgets: neither the pixels nor phase 2's frozen inputs in memory (phase 1's pooled
        # features, 5 KiB per image, stay within their budget at every size here)
        past = [n for n in counts if not {"pixels memory", "phase 2 memory"} & set(got[n, name].storage.split(", "))]
        by_size = "by size: " + ", ".join(f"{n} {got[n, name].peak_mb:.0f}" for n in counts)
        if len(past) < 2:
            where = "; ".join(f"{n}: {got[n, name].storage}" for n in counts)
            emit(
                rows, _printed("7d", f"peak memory (MB), {name}: fewer than two sizes past the budgets", by_size, where)
            )
            continue
        emit(
            rows,
            _row(
                "7d",
                f"peak memory flat past the budgets, {name}: {largest} vs {past[0]} images (MB)",
                (str(largest), got[largest, name].peak_mb),
                (str(past[0]), got[past[0], name].peak_mb),
                f"<={FLAT:.2f}x",
                by_size,
            ),
        )
    second = sorted(counts)[-2]
    for name in ["plain", *suite_names]:
        for clock, seconds in (("wall", lambda m: m.per_epoch), ("CPU", lambda m: m.per_epoch_cpu)):
            per_image = {n: 1000 * seconds(got[n, name]) / n for n in counts}
            emit(
                rows,
                _row(
                    "7e",
                    f"time per epoch linear in N, {name}: {clock} ms per image at {largest} vs {second} images",
                    (str(largest), per_image[largest]),
                    (str(second), per_image[second]),
                    "<=1.15x",
                    "ms per image by size: " + ", ".join(f"{n} {per_image[n]:.2f}" for n in counts),
                ),
            )

    # memory vs disk: the same run with budgets that hold everything in memory, at the largest size
    bench = benches[largest]
    in_memory = measure_suite(
        bench,
        "diagnostics=full",
        "augment=standard",
        "cache.pixels_memory_mib=100000",
        "cache.frozen_inputs_memory_mib=100000",
    )
    time_rows(
        rows,
        "7f",
        f"{largest} images, full/standard: kept on disk (the default budgets) vs all in memory",
        ("disk", big["full/standard"]),
        ("memory", in_memory),
        "<=1.05x",
        f"peak memory {big['full/standard'].peak_mb:.0f} MB on disk [{big['full/standard'].storage}], "
        f"{in_memory.peak_mb:.0f} MB in memory [{in_memory.storage}]",
    )

    # the search: 6 learning rates at the largest size, augment=none, neither reuse vs both
    epochs = 1 if quick else SEARCH_EPOCHS
    search = [  # diagnostics=off: what measuring costs with and without reuse is rows 7b and 2
        "augment=none",
        "diagnostics=off",
        "hydra/launcher=basic",
        "tracking.log_model=false",
        f"train.initial_epochs={epochs}",
        f"train.fine_tune_epochs={epochs}",
        "train.fine_tune_lr=" + ",".join(LEARNING_RATES),
    ]
    plain_wall, plain_search = bench.ablate(*search, "cache.phase1=false", "cache.features=false", multirun=True)
    reused_wall, reused_search = bench.ablate(*search, "cache.phase1=true", "cache.features=true", multirun=True)
    largest_difference, equal_final, jobs = relative_differences(bench, reused_search, plain_search, "val_loss")
    where = sorted({_where(r) for r in bench.runs(reused_search)})
    emit(
        rows,
        _row(
            "7g",
            f"{len(LEARNING_RATES)}-rate fine_tune_lr search, {largest} images, augment=none, {epochs}+{epochs} "
            "epochs: phase-1 cache and frozen inputs vs neither (wall s)",
            ("neither", plain_wall),
            ("both", reused_wall),
            ">=3x",
            f"kept: {'; '.join(where)}; final val_loss bit-equal in {equal_final} of {jobs} jobs, largest "
            f"val_loss difference at any epoch {largest_difference:.1e} relative",
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the speed")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of benchmarks 1, 2 and 4")
    parser.add_argument("--out", default=str(HERE / "speed.csv"))
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated groups of benchmarks, of {', '.join(GROUPS)}"
    )
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    if not wanted <= set(GROUPS):
        parser.error(f"--only takes groups of {', '.join(GROUPS)}, not {', '.join(sorted(wanted - set(GROUPS)))}")
    sizes = QUICK if args.quick else COURSE
    rows: list[dict] = []

    if "7" in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            cost_against_size(Path(tmp), args.quick, rows)
    if wanted & COURSE_GROUPS:
        course_groups(sizes, wanted, args.repeats, rows)
    s = sizes
    epochs = f"{s.initial_epochs}+{s.fine_tune_epochs} epochs"
    course = f"{s.image_size} px, batch {s.batch_size}, {2 * s.per_class} images, {epochs}"
    by_size = SIZE_SETUP.format(1 if args.quick else SEARCH_EPOCHS)
    finish(rows, args, "; ".join(([course] if wanted & COURSE_GROUPS else []) + ([by_size] if "7" in wanted else [])))


def course_groups(sizes: Sizes, wanted: set[str], repeats: int, rows: list[dict]) -> None:
    """Groups 1-6, at the course's sizes on one generated folder."""
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), sizes)
        # a full-sized warm-up: file-system caches and the MLflow store exist before anything is timed
        bench.ablate("diagnostics=off", "cache.phase1=false", "train.initial_epochs=1", "train.fine_tune_epochs=1")

        plain, plain_phases, off, off_phases, full, final, feat_on, feat_off = [], [], [], [], [], [], [], []
        off_run = None
        if wanted & {"5", "6"} and "1" not in wanted:  # rows 5 and 6 read the plain run of group 1
            wall, experiment = bench.ablate("diagnostics=off", "cache.phase1=false")
            off_rss, off_run = bench.peak_rss_mb[experiment], bench.run(experiment)
        for _ in range(repeats if "1" in wanted else 0):
            wall, phases = bench.plain_keras()
            plain.append(wall)
            plain_phases.append(phases["phase1_seconds"] + phases["phase2_seconds"])
            wall, experiment = bench.ablate("diagnostics=off", "cache.phase1=false")  # every run trains phase 1
            off.append(wall)
            off_rss = bench.peak_rss_mb[experiment]
            off_run = bench.run(experiment)
            off_phases.append(_seconds(off_run, "phase1") + _seconds(off_run, "phase2"))
            for level, times in (("full", full), ("final", final)):
                times.append(bench.ablate(f"diagnostics={level}", "cache.phase1=false")[0])
            # phase 2 as short as possible: only phase 1's seconds are compared
            phase1_only = ["augment=none", "cache.phase1=false", "model.fine_tune_at=154", "train.fine_tune_epochs=1"]
            for flag, times in (("true", feat_on), ("false", feat_off)):
                experiment = bench.ablate(*phase1_only, f"cache.features={flag}")[1]
                times.append(_seconds(bench.run(experiment), "phase1"))

        if "1" in wanted:
            emit(
                rows,
                _row(
                    "1",
                    "one run, diagnostics=off vs plain Keras script (wall s)",
                    ("suite", med(off)),
                    ("plain", med(plain)),
                    "<=1.10x",
                    "includes start-up: imports, checking every image, MLflow logging, plots",
                ),
            )
            emit(
                rows,
                _row(
                    "1b",
                    "the two phases only, diagnostics=off vs plain Keras script (s)",
                    ("suite", med(off_phases)),
                    ("plain", med(plain_phases)),
                    "<=1.10x",
                    "from compile to the end of fit, each phase (timing.phase*_seconds tags)",
                ),
            )
            emit(rows, _row("2", "diagnostics=full vs off (wall s)", ("full", med(full)), ("off", med(off)), "<=1.3x"))
            emit(
                rows,
                _row(
                    "2b",
                    "diagnostics=final vs off (wall s)",
                    ("final", med(final)),
                    ("off", med(off)),
                    "<=1.10x",
                    "measures the last epoch of each phase only",
                ),
            )
            emit(
                rows,
                _row(
                    "4",
                    "phase 1 with augment=none: speed-up of the feature cache (phase-1 s)",
                    ("uncached", med(feat_off)),
                    ("cached", med(feat_on)),
                    ">=5x",
                    "diagnostics=full (the default)",
                ),
            )

        if "3" in wanted:
            depths = "model.fine_tune_at=" + ",".join(str(d) for d in sizes.depths)
            study = [depths, "hydra/launcher=basic"]  # one seed: the unfreeze_depth experiment adds 3 replicates
            uncached_wall, uncached = bench.ablate(*study, "cache.phase1=false", multirun=True)
            cached_wall, cached = bench.ablate(*study, "cache.phase1=true", multirun=True)
            same, values = identical_metrics(bench, cached, uncached)
            phase_totals = {
                name: [sum(_seconds(r, phase) for r in bench.runs(sweep)) for phase in ("phase1", "phase2")]
                for name, sweep in (("uncached", uncached), ("cached", cached))
            }
            bound = amdahl_bound(uncached_wall, phase_totals["uncached"][0], len(sizes.depths))
            emit(
                rows,
                _row(
                    "3",
                    f"unfreeze_depth study, {len(sizes.depths)} depths: speed-up of the phase-1 cache (wall s)",
                    ("uncached", uncached_wall),
                    ("cached", cached_wall),
                    f">={0.9 * bound:.2f}x",
                    f"target: 0.9 of the Amdahl bound {bound:.2f}x that phase-1 reuse allows; identical metrics: "
                    f"{'yes' if same else 'NO'} ({values} values compared); phase 1 in all "
                    f"runs {phase_totals['uncached'][0]:.0f} s -> {phase_totals['cached'][0]:.0f} s, phase 2 "
                    f"{phase_totals['uncached'][1]:.0f} s -> {phase_totals['cached'][1]:.0f} s",
                ),
            )

        if "3b" in wanted:
            # 3b: a learning-rate search of 6 trials at the default depth, as a grid (the basic sweeper: the same
            # six rates on both sides, no sampler or pruner deciding differently on float-tolerance-equal metrics)
            search = ["augment=none", "hydra/launcher=basic", "train.fine_tune_lr=" + ",".join(LEARNING_RATES)]
            plain_wall, plain_search = bench.ablate(
                *search, "cache.phase1=false", "cache.features=false", multirun=True
            )
            reused_wall, reused_search = bench.ablate(
                *search, "cache.phase1=true", "cache.features=true", multirun=True
            )
            largest, equal_final, jobs = relative_differences(bench, reused_search, plain_search, "val_loss")
            used = sorted({r.data.tags.get("feature_cache.phase2", "?") for r in bench.runs(reused_search)})
            phase2 = [sum(_seconds(r, "phase2") for r in bench.runs(x)) for x in (plain_search, reused_search)]
            emit(
                rows,
                _row(
                    "3b",
                    f"{len(LEARNING_RATES)}-trial fine_tune_lr search, augment=none: phase-1 cache and frozen inputs "
                    "vs neither (wall s)",
                    ("neither", plain_wall),
                    ("both", reused_wall),
                    ">=3x",
                    f"phase 2 in all runs {phase2[0]:.0f} s -> {phase2[1]:.0f} s ({'; '.join(used)}); the same in "
                    "exact arithmetic, apart by rounding that training amplifies: final val_loss bit-equal in "
                    f"{equal_final} of {jobs} jobs, largest val_loss difference at any epoch {largest:.1e} relative",
                ),
            )

        if "5" in wanted:
            ceiling = ceiling_throughput(bench)
            frozen = ceiling["per_epoch"] * sizes.initial_epochs / _seconds(off_run, "phase1")
            unfrozen = ceiling["per_epoch"] * sizes.fine_tune_epochs / _seconds(off_run, "phase2")
            for number, what, suite, reference, name in (
                ("5a", "frozen phase vs raw model.fit on arrays (images/s)", frozen, "frozen_fit", "raw fit"),
                ("5b", "unfrozen phase vs raw model.fit on arrays (images/s)", unfrozen, "unfrozen_fit", "raw fit"),
            ):
                emit(
                    rows,
                    _row(
                        number,
                        what,
                        ("suite", suite),
                        (name, ceiling[reference]),
                        ">=0.8x",
                        "both include compile and tracing",
                    ),
                )
            emit(
                rows,
                _row(
                    "5c",
                    "frozen phase vs base.predict, steady state (images/s)",
                    ("suite", frozen),
                    ("predict", ceiling["predict"]),
                    ">=0.8x",
                    "the hard ceiling: forward pass only, no tracing",
                ),
            )

        if "6" in wanted:
            per_image = frozen_input_bytes(sizes.image_size)
            epochs = f"train.fine_tune_epochs={MEMORY_EPOCHS}"
            suite_mib = resident_per_epoch(bench, "diagnostics=full", "cache.phase1=false", epochs)
            plain_mib = bench.plain_keras(MEMORY_EPOCHS, memory=True)[1]["phase2_epoch_end_mib"]
            emit(
                rows,
                _printed(
                    "6",
                    "peak memory (RSS) of one run, diagnostics=off; frozen inputs per 1000 images",
                    f"{off_rss:.0f} MB; features {per_image['pooled'] * 1000 / 2**20:.1f} MB, bottom at depth "
                    f"120 {per_image['bottom'] * 1000 / 2**20:.0f} MB",
                    f"RSS at the end of each of {MEMORY_EPOCHS} phase-2 epochs, suite (diagnostics=full) "
                    f"{suite_mib} MiB, plain Keras script {plain_mib} MiB; growth over the second half: suite "
                    f"{late_growth(suite_mib):+.1f} MiB, plain {late_growth(plain_mib):+.1f} MiB",
                ),
            )


def finish(rows: list[dict], args: argparse.Namespace, setup: str) -> None:
    """Print the table again and write it to ``--out``."""
    rows.sort(key=lambda row: (int(row["benchmark"][0]), row["benchmark"]))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    setup = f"{setup}, repeats {args.repeats}"
    table = pd.DataFrame(rows).assign(setup=setup, machine=machine)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    with pd.option_context("display.max_colwidth", 80, "display.width", 250):
        print(table.drop(columns=["setup", "machine"]).to_string(index=False))
    print(f"\n{setup}; {machine}; written to {args.out}")


if __name__ == "__main__":
    main()

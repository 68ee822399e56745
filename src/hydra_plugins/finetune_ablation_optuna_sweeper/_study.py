"""The study side of a sweep: storage URL, study name, counting toward the total, heartbeats, tell.

``n_trials`` is a TOTAL over the study, so every decision to start a trial reads the storage:
- before each ask, the trials that are COMPLETE, PRUNED or RUNNING (any worker's) are counted, and no
  trial is asked once they reach the total;
- after the ask, the new trial claims its place by number: if the trials numbered below it (COMPLETE,
  PRUNED or RUNNING) already reach the total, another worker asked in the same instant, and this one is
  told FAIL at once with the user attr ``surplus`` instead of running. So workers never overshoot;
- a RUNNING trial that later fails is replaced by its own worker, so the study ends with exactly
  ``n_trials`` complete + pruned trials while its workers live. A worker killed outright leaves its
  trials RUNNING: they count until their heartbeat is older than the grace period, then the next
  sweeper to start a trial marks them FAIL and replaces them."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

log = logging.getLogger(__name__)

LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
SURPLUS_USER_ATTR = "surplus"


def default_storage_url() -> str:
    """``sqlite:///<project>/mlruns/optuna.db``: absolute, beside the suite's MLflow store."""
    from finetune_ablation.sweeper_api import optuna_storage_dir

    folder = optuna_storage_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def absolute_storage_url(url: str | None) -> str:
    """The storage URL every job can use: the default, or a relative sqlite path made absolute here
    (jobs may run in other working directories)."""
    if not url:
        return default_storage_url()
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return url
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError(f"hydra.sweeper.storage={url}: an in-memory database cannot be shared with the jobs")
    path = Path(parsed.database).expanduser()
    if not path.parent.is_dir():
        raise ValueError(f"hydra.sweeper.storage={url}: the folder {path.parent} does not exist")
    return f"sqlite:///{path.resolve()}"


def printable_url(url: str) -> str:
    """``url`` with any password hidden, for logs and MLflow tags."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    direction: str,
    sampler: optuna.samplers.BaseSampler,
) -> optuna.Study:
    """Create the study or continue it; refuse to continue one optimised in the other direction."""
    study = optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, direction=direction, load_if_exists=True
    )
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {name!r} already exists and is to {study.direction.name.lower()}, not {direction}: "
            "set hydra.sweeper.study_name to start another study"
        )
    return study


def live_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=LIVE)


def fail_stale_trials(study: optuna.Study) -> None:
    """FAIL the RUNNING trials of killed workers (heartbeat older than the grace period)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def ask(study: optuna.Study, distributions: dict) -> Trial:
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for optimize(); this sweeper records them itself.
        warnings.filterwarnings("ignore", message=".*Heartbeat.*")
        return study.ask(distributions)


def is_surplus(study: optuna.Study, trial: Trial, total: int) -> bool:
    """True when the trials numbered below ``trial`` already reach the total (see module docstring)."""
    return sum(1 for t in live_trials(study) if t.number < trial.number) >= total


def tell(study: optuna.Study, trial: Trial, state: TrialState, value: float | None = None) -> None:
    """Tell a result once; a trial already finished (e.g. failed as stale by another worker) is left."""
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
    except RuntimeError as exc:
        # The grid sampler calls study.stop() when the grid is done, which raises outside optimize();
        # the trial's state is already stored by then.
        if "Study.stop" not in str(exc):
            raise


class Heartbeat:
    """Records a heartbeat for this worker's running trials while the sweep runs.

    Without it a killed sweeper's RUNNING trials would count toward the total forever."""

    def __init__(self, storage: optuna.storages.RDBStorage, study: optuna.Study, interval: int):
        self._storage = storage
        self._study_id = storage.get_study_id_from_name(study.study_name)
        self._interval = interval
        self._trial_ids: dict[int, int] = {}  # trial number -> storage id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval)

    def add(self, trial: Trial) -> None:
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, trial.number)
        with self._lock:
            self._trial_ids[trial.number] = trial_id
        self._beat([trial_id])

    def discard(self, trials: Iterable[Trial]) -> None:
        with self._lock:
            for trial in trials:
                self._trial_ids.pop(trial.number, None)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._trial_ids.values())
            self._beat(ids)

    def _beat(self, trial_ids: list[int]) -> None:
        for trial_id in trial_ids:
            try:
                self._storage.record_heartbeat(trial_id)
            except Exception as exc:  # a storage hiccup must not end the sweep; the next beat retries
                log.warning("could not record the heartbeat of trial id %s: %s", trial_id, exc)

"""How the sweeper hands a trial to its job, and how both sides open the Optuna storage.

The job gets one extra override, ``optuna={study_name: ..., storage: ..., trial_number: ..., pruner: ...}``,
so it can load the study, report intermediate values to its own trial and ask the same pruner whether
to stop. Kept free of heavy imports: Hydra imports this module on every start-up (plugin scan)."""

import math
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CONFIG_KEY = "optuna"  # the job config's field for the handoff (finetune_ablation.config.Config.optuna)
PRUNED_USER_ATTR = "pruned_at_epoch"  # set by the job on its trial when it stopped early
MLFLOW_RUN_USER_ATTR = "mlflow_run_id"  # set by the job: which MLflow run trained this trial
SQLITE_TIMEOUT_S = 60  # sweepers and jobs write one sqlite file at once: wait for the lock, don't fail
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _quote(text: str, quote: str = "'") -> str:
    """A quoted string in Hydra's (and OmegaConf's) grammar: escape the quotes, and backslashes only
    where they precede a quote or the end (elsewhere a backslash is literal)."""
    escaped = re.sub(rf"(\\*){quote}", lambda m: m.group(1) * 2 + "\\" + quote, text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"{quote}{escaped}{quote}"


def encode_value(value: Any) -> str:
    """``value`` as Hydra override text that parses back to the same value and type.

    Strings are always quoted, so ``'1e-4'``, ``'true'`` or a URL with ``:`` stay strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # repr: exact round trip
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise ValueError(f"cannot hand the key {key!r} to a job through an override")
        return "{" + ",".join(f"{k}:{encode_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode_value(v) for v in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} as a Hydra override value: {value!r}")


@dataclass(frozen=True)
class TrialHandoff:
    """What a job needs to report to its trial. ``pruner`` is a Hydra-instantiable config (``_target_``)."""

    study_name: str
    storage: str
    trial_number: int
    pruner: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "trial_number": self.trial_number,
            "pruner": dict(self.pruner),
        }

    def to_override(self) -> str:
        """The job override ``optuna={...}`` (the schema's ``optuna: Any`` field takes the dict)."""
        return f"{CONFIG_KEY}={encode_value(self.as_dict())}"

    @classmethod
    def from_config(cls, node: Any) -> "TrialHandoff | None":
        """The handoff in a job's ``cfg.optuna`` (None when the job is not an Optuna trial)."""
        if not node:
            return None
        data = dict(node.items())
        missing = [k for k in ("study_name", "storage", "trial_number") if data.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{CONFIG_KEY}.{missing[0]} is missing: the Optuna sweeper sets {CONFIG_KEY}")
        pruner = data.get("pruner") or {}
        return cls(
            study_name=str(data["study_name"]),
            storage=str(data["storage"]),
            trial_number=int(data["trial_number"]),
            pruner=_plain(pruner),
        )


def _plain(node: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def open_storage(url: str, heartbeat_interval: int | None = None, attempts: int = 3):
    """An ``optuna.storages.RDBStorage`` for ``url``, waiting on sqlite locks instead of failing.

    Retried a few times: workers that start together on a new database race to create its tables, and the
    loser's error depends on the database and the moment (docs/stack-facts.md O3)."""
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    heartbeat = (
        {"heartbeat_interval": heartbeat_interval, "grace_period": 5 * heartbeat_interval} if heartbeat_interval else {}
    )
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(attempt)
    raise AssertionError("unreachable")

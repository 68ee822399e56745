"""What a run is called in MLflow: a name that says what the run is, so the runs table reads without opening
a run (docs/mlflow-ui.md).

- a job of a sweep: what the job varies (``dropout=0.2 augment=none seed=2``), unique within the sweep;
  an Optuna trial leads with its number (``trial 7 fine_tune_lr=0.000123``);
- a single run: its data folder and key settings (``alpaca MobileNetV2 fine_tune_at=120 dropout=0.2
  augment=standard seed=42``);
- a sweep's parent: the study and when it started (``val_beats_train 2026-12-07 14:02``);
- a reproduction: ``reproduce <name>`` (reproduce/app.py sets it as ``tracking.run_name``);
- ``tracking.run_name``, when set, wins over all of these.

What a sweep varies is read from its definition: the launch's command-line overrides (the parent run's
``hydra.overrides`` tag, so a job on another machine knows them too) and ``hydra.sweeper.params``, parsed
by Hydra's own override parser. No TensorFlow here."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from . import record as rec
from .config import COMPUTING, role_of
from .paths import CONF_DIR

if TYPE_CHECKING:
    from mlflow import MlflowClient

_SEP = " "


# ---------------------------------------------------------------------------------------------------
# What a sweep varies


def _parsed(tokens: Iterable[str]) -> list[Any]:
    """Hydra's ``Override`` objects of ``key=value`` tokens (none when a token does not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(tokens))
    except Exception:  # a capped or hand-edited tag: name the run without it
        return []


def sweep_definition(launch_overrides: Iterable[str], sweeper_params: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """``key -> its values`` for every key the sweep varies, in the order Hydra launches them: the sweeper's
    ``params`` first, then the command line's sweeps (which win for the same key). A key with one value is
    constant, not varied; the values of a range or an Optuna search space are unknown until a job runs
    (an empty list). Only keys that decide what a run computes count (config.Role)."""
    tokens = [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    tokens += [t for t in launch_overrides if not t.startswith("hydra.")]
    found: dict[str, list[str]] = {}
    for override in _parsed(tokens):
        key = override.key_or_group
        if role_of(key) not in COMPUTING or override.is_delete():
            continue
        if not override.is_sweep_override():
            found.pop(key, None)  # a single value on the command line replaces a swept one
            continue
        try:
            values = [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # an interval or Optuna's tag(log, interval(...)): values come per trial
            values = []
        if len(values) == 1:
            found.pop(key, None)
        else:
            found[key] = values
    return found


def _short_keys(keys: Iterable[str]) -> dict[str, str]:
    """``model.dropout -> dropout`` where the last part is unique among ``keys``, else the whole key."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _capped(name: str, suffix: str = "") -> str:
    """MLflow's limit on a run name; a cut name keeps ``suffix`` (what makes it unique)."""
    limit = rec.MAX_RUN_NAME_LENGTH
    if len(name) + len(suffix) <= limit:
        return name + suffix
    return name[: limit - len(suffix) - 1].rstrip() + "…" + suffix


def _number(value: str) -> str:
    """An Optuna-sampled float (``0.00012345678``) to 3 significant digits; anything else as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() or len(value) <= 6 else f"{number:.3g}"


def job_name(
    job_overrides: Iterable[str], varied: Mapping[str, list[str]], job_num: int, trial: str | None = None
) -> str:
    """A sweep job's name: its value of every varied key (``dropout=0.2 augment=none seed=2``).

    Unique within the sweep, because two jobs of one sweep differ in at least one varied value; where that
    cannot be promised (a value listed twice, a range or search space, a name cut to MLflow's limit) the job's
    number is added (``#3``), and an Optuna trial leads with its number."""
    pairs_of = (token.split("=", 1) for token in job_overrides if "=" in token and not token.startswith("~"))
    values = {key.lstrip("+"): value for key, value in pairs_of}
    shown = [k for k in varied if k in values]
    short = _short_keys(shown)
    pairs = [f"{short[k]}={_number(values[k]) if trial is not None else values[k]}" for k in shown]
    if trial is not None:
        return _capped(_SEP.join([f"trial {trial}", *pairs]))
    repeated = any(not v or len(set(v)) < len(v) for v in varied.values())
    if not pairs:
        return f"job #{job_num}"
    name = _SEP.join(pairs)
    return _capped(name, f" #{job_num}") if repeated or len(name) > rec.MAX_RUN_NAME_LENGTH else name


# ---------------------------------------------------------------------------------------------------
# A single run


def augment_choice(augment: Any) -> str:
    """The ``augment`` option whose settings these are (``standard``), or ``custom``."""
    settings = OmegaConf.to_container(augment, resolve=True) if OmegaConf.is_config(augment) else dict(augment)
    for path in sorted((CONF_DIR / "augment").glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(option, dict) and all(settings.get(k) == v for k, v in option.items()):
            return path.stem
    return "custom"


def single_run_name(cfg: DictConfig) -> str:
    """A run outside a sweep: its data folder and the settings the suite's questions turn on."""
    folder = Path(str(cfg.data.dir)).name if cfg.data.dir else "data"
    m = cfg.model
    parts = [folder, str(m.architecture), f"fine_tune_at={m.fine_tune_at}", f"dropout={m.dropout}"]
    parts.append(f"augment={augment_choice(cfg.augment)}")
    if m.freeze_bn:
        parts.append("freeze_bn=true")
    parts.append(f"seed={cfg.seed}")
    return _capped(_SEP.join(parts))


# ---------------------------------------------------------------------------------------------------
# Where the names are decided


def _launch_overrides(client: MlflowClient | None, parent_id: str | None) -> list[str] | None:
    """The sweep's command-line overrides, as its parent run logged them (None without a parent)."""
    if client is None or parent_id is None:
        return None
    tag = client.get_run(parent_id).data.tags.get(rec.HYDRA_OVERRIDES_TAG)
    return rec.parse_overrides(tag) if tag is not None else None


def run_name(cfg: DictConfig, client: MlflowClient | None = None, parent_id: str | None = None) -> str:
    """The name of the run an ``ablate`` job opens: ``tracking.run_name`` if set, else what the job varies
    within its sweep (a job of a multirun), else the single run's name."""
    if cfg.tracking.run_name:
        return _capped(str(cfg.tracking.run_name))
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return single_run_name(cfg)
    hc = HydraConfig.get()
    launch = _launch_overrides(client, parent_id)
    if launch is None:  # no parent to read the sweep from: still unique within the sweep
        return _capped(single_run_name(cfg), f" #{hc.job.num}")
    varied = sweep_definition(launch, hc.sweeper.get("params"))
    handoff = cfg.get("optuna")
    trial = str(handoff.get("trial_number")) if handoff else None
    return job_name(list(hc.overrides.task), varied, hc.job.num, trial)


def parent_run_name(config: DictConfig, started: datetime.datetime | None = None) -> str:
    """A sweep's parent: the study (``experiment=NAME``), else what the sweep varies, and when it started."""
    when = (started or datetime.datetime.now()).strftime("%Y-%m-%d %H:%M")
    study = config.hydra.runtime.choices.get("experiment")
    if not study:
        varied = sweep_definition(list(config.hydra.overrides.task), config.hydra.sweeper.get("params"))
        study = "sweep " + " x ".join(_short_keys(varied).values()) if varied else "sweep"
    return _capped(f"{study} {when}")
